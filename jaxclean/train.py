"""Classifier training: the pure jitted steps (teacher and distillation) and the loop around them.

The steps are module-level functions of (state, batch, rng) so tests and benchmarks call them
directly. The loop is thin: it draws batches in an order fixed by (seed, epoch), calls a step,
logs, and checkpoints with Orbax so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclean import checkpointing, faults, sharding
from jaxclean.data import ImageDataset
from jaxclean.metrics import MetricWriter, progress


class TrainState(flax.struct.PyTreeNode):
    """Everything a classifier's training changes, plus how to apply it."""

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def apply_gradients(self, grads, batch_stats):
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training-time augmentation, applied inside the jitted step.

    Attributes:
      crop_padding: zero-pad by this many pixels, then crop back at a random offset.
      flip: random horizontal flips.
      corruption: probability that an image also gets a random photometric corruption
        (`corrupt_image`). Meant for the generator's semantic encoder: CLIP, which the paper's
        generators condition on, keeps describing an image through noise and contrast changes
        because of the scale of its training data; a small encoder trained on clean images
        does not, and its embedding of a corrupted image falls off the data it was trained on.
      corruption_noise: the largest standard deviation of the corruption's pixel noise; 0 leaves
        contrast and brightness only. The trigger-learnability classifiers use 0: a Blended
        trigger lowers an image's contrast and lifts its black level, which alone leaves a small
        classifier unable to read the image, while pixel noise would teach it to ignore the faint
        pixel traces it is there to find.
    """

    crop_padding: int = 0
    flip: bool = False
    corruption: float = 0.0
    corruption_noise: float = 0.2


# ----------------------------------------------------------------------------- pure functions


def normalize(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] to float32 [-1, 1], the range the generators use too."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def augment_images(images: jax.Array, keys: jax.Array, augment: Augment) -> jax.Array:
    """Random crop-with-padding and flip, one key per image.

    Args:
      images: float [N, H, W, C].
      keys: [N] keys, one per image, so an image's augmentation does not depend on its batch.
      augment: what to apply.
    """
    if augment.crop_padding == 0 and not augment.flip and augment.corruption == 0:
        return images
    pad = augment.crop_padding
    height, width = images.shape[1:3]

    def one(image, key):
        crop_key, flip_key = jax.random.split(key)
        if augment.corruption:
            # Its own key, so crops and flips stay those of a run without corruption.
            image = corrupt_image(
                image,
                jax.random.fold_in(key, AUGMENT_CORRUPTION_STREAM),
                augment.corruption,
                augment.corruption_noise,
            )
        if pad:
            # Pad with the value of black: the images are in [-1, 1].
            padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=-1.0)
            offsets = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
            image = jax.lax.dynamic_slice(
                padded, (offsets[0], offsets[1], 0), (height, width, image.shape[-1])
            )
        if augment.flip:
            image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
        return image

    return jax.vmap(one)(images, keys)


def corrupt_image(
    image: jax.Array,
    key: jax.Array,
    probability: float,
    max_noise_std: float = 0.2,
    min_contrast: float = 0.5,
) -> jax.Array:
    """With `probability`, a random contrast, brightness and pixel-noise corruption of `image`.

    x' = c * x + (1 - c) * b + s * n: contrast c ~ U(min_contrast, 1) towards a flat level
    b ~ U(-1, 1), plus Gaussian pixel noise n of std s ~ U(0, max_noise_std), clipped to
    [-1, 1]; the common photometric corruptions of corruption-robustness benchmarks
    (ImageNet-C's contrast, brightness and Gaussian noise), at strengths that leave the content
    recognisable. With max_noise_std 0 the draws are the same and only the noise is gone; a
    higher min_contrast keeps the draws mild.
    """
    apply_key, contrast_key, level_key, amount_key, noise_key = jax.random.split(key, 5)
    contrast = jax.random.uniform(contrast_key, (), minval=min_contrast, maxval=1.0)
    level = jax.random.uniform(level_key, (), minval=-1.0, maxval=1.0)
    amount = jax.random.uniform(amount_key, (), maxval=max_noise_std)
    noise = jax.random.normal(noise_key, image.shape)
    corrupted = jnp.clip(contrast * image + (1.0 - contrast) * level + amount * noise, -1.0, 1.0)
    return jnp.where(jax.random.bernoulli(apply_key, probability), corrupted, image)


# Streams folded into an image's own key, one per corruption, so that each draws independently
# of the others and of the crops and flips (which use the key itself).
AUGMENT_CORRUPTION_STREAM = 2
STUDENT_CORRUPTION_STREAM = 3
INVARIANCE_COPY_STREAM = 4


def corrupt_images(
    images: jax.Array,
    keys: jax.Array,
    stream: int,
    probability: float,
    max_noise_std: float = 0.2,
) -> jax.Array:
    """`corrupt_image` of each of [N, ...] images from its own key of [N] keys, folded with
    `stream`, so an image's corruption does not depend on its batch."""
    return jax.vmap(
        lambda image, key: corrupt_image(
            image, jax.random.fold_in(key, stream), probability, max_noise_std
        )
    )(images, keys)


def sample_keys(rng: jax.Array, indices: jax.Array) -> jax.Array:
    """One key per sample, folded from its index in the dataset."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(indices)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    alpha: float,
    temperature: float,
) -> jax.Array:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, label).

    The KL is summed over classes and averaged over the batch (Hinton et al. 2015); T^2 keeps
    its gradient on the scale of the cross-entropy's as T grows.
    """
    teacher_log_probs = jax.nn.log_softmax(teacher_logits / temperature)
    student_log_probs = jax.nn.log_softmax(student_logits / temperature)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return alpha * temperature**2 * kl.mean() + (1.0 - alpha) * cross_entropy(
        student_logits, labels
    )


def teacher_prior_correction(
    teacher_labels: np.ndarray, trusted_labels: np.ndarray, num_classes: int
) -> tuple[float, ...]:
    """log p_trusted(y) - log p_teacher(y): the teacher's logits re-based on the trusted prior.

    A classifier's logits carry the label prior of its training set (up to a constant,
    logits = log p(x | y) + log p(y)). Poisoning relabels images to the target, so the teacher
    learns an inflated target prior (10% poisoning of Fashion-MNIST: 0.20 instead of 0.10) and
    leans towards the target wherever an image is ambiguous; a student fitting its logits at
    high T copies that lean into every image (Fashion-MNIST BadNets: it called 3.0% of
    non-target test images the target, the clean reference 1.8%; with this, 1.7%). Adding the
    offset is the label-shift correction of Saerens et al. (2002), in the post-hoc logit
    adjustment form of Menon et al. (2021), with the trusted split's labels as the clean prior.
    It reads only label counts, so every class is corrected alike and no target need be known.
    Counts get add-one smoothing.
    """

    def log_prior(labels):
        counts = np.bincount(np.asarray(labels), minlength=num_classes)[:num_classes] + 1.0
        return np.log(counts / counts.sum())

    return tuple(float(v) for v in log_prior(trusted_labels) - log_prior(teacher_labels))


def _step_metrics(loss, logits, labels, grads, params) -> dict:
    return {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
    }


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, augment: Augment):
    """One cross-entropy step: the teacher's, and every baseline trained without distillation.

    Args:
      state: the classifier.
      batch: {"image": uint8 [B, H, W, C], "label": int32 [B], "index": int [B]}.
      rng: this epoch's key; each sample's augmentation key folds in its index.
      augment: static augmentation settings.

    Returns:
      The updated state and a dict of scalar metrics.
    """
    images = augment_images(normalize(batch["image"]), sample_keys(rng, batch["index"]), augment)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return cross_entropy(logits, batch["label"]), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads, batch_stats)
    return new_state, _step_metrics(loss, logits, batch["label"], grads, state.params)


def feature_invariance(clean: jax.Array, corrupted: jax.Array) -> jax.Array:
    """How far a corruption moves pooled features, on the features' own scale.

    The mean over features of E[(f(x) - f(x'))^2] / (half the summed batch variances of f(x)
    and f(x')): 0 when the corruption moves nothing, about 2 when the two copies' features are
    unrelated, and unchanged when the features are scaled, so a network cannot meet it by
    shrinking its features (a plain squared distance is met that way).

    Args:
      clean, corrupted: [B, D] features of each image and of its corrupted copy.
    """
    scale = 0.5 * (jnp.var(clean, axis=0) + jnp.var(corrupted, axis=0)) + 1e-6
    return jnp.mean(jnp.mean((clean - corrupted) ** 2, axis=0) / scale)


def invariance_step(state: TrainState, batch: dict, rng: jax.Array, *, augment: Augment, weight):
    """Cross-entropy on each image and a corrupted copy, plus weight x `feature_invariance`.

    For the generator's semantic encoder, trained so from the start: a classifier learns to
    recognise a corrupted image without its features holding still, and a Blended trigger (a
    contrast drop towards a noise pattern) then moved the shipped encoder's embedding as far as
    the nearest other trusted image is, partly in one direction common to all images, which a
    generator renders and a classifier trained on poisoned labels can learn. The copy is
    corrupted always, with the full family (`corrupt_image`: contrast down to 0.5 towards any
    level, pixel noise up to augment.corruption_noise); the recipe's random corruption is not
    applied on top, so each pair is a clean image and its corrupted copy.

    Args:
      state: the encoder (a classifier whose __call__ takes output="both").
      batch, rng: as for `train_step`.
      augment: static augmentation settings (crops and flips apply to both copies alike).
      weight: of the invariance term against the two cross-entropies (static).
    """
    keys = sample_keys(rng, batch["index"])
    clean_augment = dataclasses.replace(augment, corruption=0.0)
    images = augment_images(normalize(batch["image"]), keys, clean_augment)
    corrupted = corrupt_images(
        images, keys, INVARIANCE_COPY_STREAM, 1.0, max_noise_std=augment.corruption_noise
    )
    labels = batch["label"]

    def loss_fn(params):
        (logits, features), updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            jnp.concatenate([images, corrupted]),
            train=True,
            output="both",
            mutable=["batch_stats"],
        )
        ce = cross_entropy(logits, jnp.concatenate([labels, labels]))
        invariance = feature_invariance(*jnp.split(features, 2))
        aux = (logits[: labels.shape[0]], updates["batch_stats"], ce, invariance)
        return ce + weight * invariance, aux

    (loss, (logits, batch_stats, ce, invariance)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(state.params)
    new_state = state.apply_gradients(grads, batch_stats)
    metrics = _step_metrics(loss, logits, labels, grads, state.params)
    metrics.update(cross_entropy=ce, invariance=invariance)
    return new_state, metrics


def distill_step(
    state: TrainState,
    teacher_variables: dict,
    batch: dict,
    rng: jax.Array,
    *,
    teacher_apply: Callable,
    augment: Augment,
    alpha: float,
    temperature: float,
    student_corruption: float = 0.0,
    teacher_logit_offset: tuple[float, ...] | None = None,
):
    """One knowledge-distillation step: the frozen teacher and the student see the same batch.

    Args:
      state: the student.
      teacher_variables: the teacher's {"params", "batch_stats"}; used in inference mode.
      batch: as for `train_step` (here the regenerated images).
      rng: this epoch's key.
      teacher_apply: the teacher module's apply function (static).
      augment: static augmentation settings, applied once and fed to both networks.
      alpha: weight of the distillation term, in [0, 1].
      temperature: softmax temperature T > 0.
      student_corruption: probability that the student's copy of an image also gets a random
        photometric corruption (`corrupt_image`) while the teacher labels the uncorrupted one,
        as in Noisy Student (Xie et al. 2020). The student then learns to give the teacher's
        answer for the clean image whatever the contrast, brightness or noise, rather than
        copying how the teacher's outputs move with them, which is where a backdoor that
        answers to such changes (Blended) lives.
      teacher_logit_offset: one value per class (static), added to the teacher's logits before
        they become soft labels: `teacher_prior_correction`'s log prior ratio.
    """
    keys = sample_keys(rng, batch["index"])
    images = augment_images(normalize(batch["image"]), keys, augment)
    teacher_logits = jax.lax.stop_gradient(teacher_apply(teacher_variables, images, train=False))
    if teacher_logit_offset is not None:
        teacher_logits = teacher_logits + jnp.asarray(teacher_logit_offset, teacher_logits.dtype)
    if student_corruption:
        images = corrupt_images(images, keys, STUDENT_CORRUPTION_STREAM, student_corruption)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = distillation_loss(logits, teacher_logits, batch["label"], alpha, temperature)
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads, batch_stats)
    metrics = _step_metrics(loss, logits, batch["label"], grads, state.params)
    metrics["teacher_agreement"] = jnp.mean(
        jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)
    )
    return new_state, metrics


def predict_step(apply_fn: Callable, variables: dict, images: jax.Array) -> jax.Array:
    """Logits in inference mode (running batch-norm statistics)."""
    return apply_fn(variables, normalize(images), train=False)


# ----------------------------------------------------------------------------- set-up


def make_optimizer(recipe, steps_per_epoch: int) -> tuple[optax.GradientTransformation, Callable]:
    """The optimizer and learning-rate schedule a recipe names.

    The schedule is step decay: the rate is multiplied by `lr_decay_factor` at each epoch in
    `lr_decay_epochs` (the paper: Adam 1e-3, decay at epochs 30 and 50).
    """
    boundaries = {
        int(epoch * steps_per_epoch): recipe.lr_decay_factor for epoch in recipe.lr_decay_epochs
    }
    schedule = optax.piecewise_constant_schedule(recipe.learning_rate, boundaries)
    name = recipe.optimizer
    if name == "adam":
        tx = optax.adam(schedule)
    elif name == "adamw":
        tx = optax.adamw(schedule, weight_decay=recipe.weight_decay)
    elif name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(recipe.weight_decay),
            optax.sgd(schedule, momentum=recipe.momentum, nesterov=True),
        )
    else:
        raise ValueError(f"unknown optimizer {name!r}: use adam, adamw or sgd")
    return tx, schedule


def create_train_state(
    model, tx: optax.GradientTransformation, image_shape, rng: jax.Array, mesh
) -> TrainState:
    """Initialises parameters directly in their (replicated) sharding on the mesh."""

    def init(rng):
        dummy = jnp.zeros((1, *image_shape), jnp.float32)
        variables = model.init(rng, dummy, train=False)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(variables["params"]),
            apply_fn=model.apply,
            tx=tx,
        )

    return jax.jit(init, out_shardings=sharding.replicated(mesh))(rng)


def checkpoint_tree(state) -> dict:
    """What Orbax saves: every array field of the state (step, params, opt_state, ...)."""
    return {
        field.name: getattr(state, field.name)
        for field in dataclasses.fields(state)
        if field.metadata.get("pytree_node", True)
    }


def restore_state(state, tree: dict):
    return state.replace(**tree)


def jit_step(step_fn: Callable, mesh, num_static_args: int = 0):
    """jit a (state, *static_args, batch, rng) step with the state donated and sharded.

    Args:
      step_fn: a step with keyword-only settings already bound (functools.partial).
      mesh: the mesh; the state and any extra leading arguments are replicated, the batch split.
      num_static_args: extra replicated arguments between state and batch (e.g. the teacher).
    """
    replicated = sharding.replicated(mesh)
    in_shardings = (replicated,) * (1 + num_static_args) + (
        sharding.data_sharding(mesh),
        replicated,
    )
    return jax.jit(
        step_fn,
        in_shardings=in_shardings,
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


# ----------------------------------------------------------------------------- the loop


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation for one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


@dataclasses.dataclass
class FitResult:
    state: TrainState
    steps: int
    wall_seconds: float
    images_per_second: float
    history: list


def as_arrays(dataset: ImageDataset | dict) -> dict:
    """Training fields by name; an ImageDataset gives "image" and "label"."""
    if isinstance(dataset, ImageDataset):
        return {"image": dataset.images, "label": dataset.labels}
    lengths = {len(v) for v in dataset.values()}
    if len(lengths) != 1:
        raise ValueError(f"training fields of different lengths: {lengths}")
    return dataset


def fit(
    state,
    step: Callable,
    dataset: ImageDataset | dict,
    *,
    batch_size: int,
    num_epochs: int,
    seed: int,
    mesh,
    checkpoint_dir: str,
    schedule: Callable | None = None,
    writer: MetricWriter | None = None,
    prefix: str = "train",
    checkpoint_every_steps: int = 0,
    max_to_keep: int = 2,
    log_every_steps: int = 50,
    on_epoch_end: Callable | None = None,
    description: str = "train",
) -> FitResult:
    """Runs `step` over `dataset` for `num_epochs`, resuming from the latest checkpoint.

    Args:
      state: freshly initialised state; replaced by the checkpoint's when one exists.
      step: jitted (state, batch, rng) -> (state, metrics).
      dataset: the training images, or a dict of equal-length arrays (each batch gets every
        field plus "index"); the last incomplete batch of each epoch is dropped.
      batch_size: global batch size.
      num_epochs: epochs in total, counting those done before a resume.
      seed: fixes the data order and augmentation keys.
      mesh: the device mesh.
      checkpoint_dir: the Orbax directory of this run.
      schedule: learning rate by step, for logging.
      writer: where scalars go.
      prefix: metric key prefix.
      checkpoint_every_steps: also checkpoint every this many steps (0: at epoch ends only).
      max_to_keep: checkpoints kept.
      log_every_steps: metric cadence.
      on_epoch_end: called as on_epoch_end(epoch, state) after each epoch's checkpoint.
      description: progress-bar label.
    """
    sharding.check_batch_size(batch_size)
    arrays = as_arrays(dataset)
    num_samples = len(next(iter(arrays.values())))
    steps_per_epoch = num_samples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {num_samples} samples")
    total_steps = steps_per_epoch * num_epochs
    manager = checkpointing.Checkpointer(checkpoint_dir, max_to_keep=max_to_keep)
    start = manager.latest_step() or 0
    if start:
        state = restore_state(state, manager.restore(start, checkpoint_tree(state)))
        if jax.process_index() == 0:
            print(f"{description}: resuming from step {start} of {total_steps}", flush=True)
    base_key = jax.random.key(seed)
    rows = sharding.process_rows(batch_size)
    history, order = [], None
    started, images_seen = time.perf_counter(), 0
    bar = progress(total=total_steps, initial=start, desc=description)
    log_started, log_images = time.perf_counter(), 0
    for global_step in range(start, total_steps):
        epoch, position = divmod(global_step, steps_per_epoch)
        if order is None or position == 0:
            order = epoch_order(num_samples, seed, epoch)
        indices = order[position * batch_size : (position + 1) * batch_size][rows]
        local = {name: values[indices] for name, values in arrays.items()}
        local["index"] = indices.astype(np.int32)
        batch = sharding.to_global(local, mesh)
        state, metrics = step(state, batch, jax.random.fold_in(base_key, epoch))
        images_seen += batch_size
        log_images += batch_size
        done = global_step + 1
        epoch_done = done % steps_per_epoch == 0
        checkpoint_now = epoch_done or (
            checkpoint_every_steps and done % checkpoint_every_steps == 0
        )
        if done % log_every_steps == 0 or checkpoint_now:
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            _fail_on_nonfinite(scalars, done)
            now = time.perf_counter()
            scalars["images_per_second"] = log_images / max(now - log_started, 1e-9)
            log_started, log_images = now, 0
            if schedule is not None:
                scalars["learning_rate"] = float(schedule(global_step))
            scalars["epoch"] = done / steps_per_epoch
            history.append({"step": done, **scalars})
            if writer is not None:
                writer.write_scalars(done, {f"{prefix}/{k}": v for k, v in scalars.items()})
            bar.set_postfix({k: f"{scalars[k]:.4f}" for k in ("loss", "accuracy") if k in scalars})
        if checkpoint_now:
            manager.save(done, checkpoint_tree(state))
            if epoch_done and on_epoch_end is not None:
                on_epoch_end(epoch + 1, state)
        bar.update(1)
        faults.kill_point(description, done)
    bar.close()
    manager.wait()
    manager.close()
    wall = time.perf_counter() - started
    return FitResult(state, total_steps - start, wall, images_seen / max(wall, 1e-9), history)


def _fail_on_nonfinite(scalars: dict, step: int) -> None:
    bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
    if bad:
        raise FloatingPointError(f"non-finite training metrics at step {step}: {bad}")


# ----------------------------------------------------------------------------- inference


def make_predict_fn(apply_fn: Callable, mesh) -> Callable:
    """A jitted (variables, uint8 images) -> logits, the batch split over the mesh."""
    return jax.jit(
        functools.partial(predict_step, apply_fn),
        in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
        out_shardings=sharding.data_sharding(mesh),
    )


def batched_apply(fn, params, arrays: tuple, batch_size: int, mesh) -> list[np.ndarray]:
    """Applies jitted fn(params, *batch) over every row, padding the last batch.

    Returns one numpy array per output of fn, rows in order.
    """
    num = len(arrays[0])
    rows = sharding.process_rows(batch_size)
    outputs = None
    for start in range(0, num, batch_size):
        chunk = [a[start : start + batch_size] for a in arrays]
        valid = len(chunk[0])
        if valid < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[:1], batch_size - valid, 0)]) for c in chunk]
        batch = sharding.to_global({str(i): c[rows] for i, c in enumerate(chunk)}, mesh)
        result = fn(params, *(batch[str(i)] for i in range(len(chunk))))
        result = result if isinstance(result, tuple) else (result,)
        host = [sharding.to_host(r)[:valid] for r in result]
        outputs = (
            [[h] for h in host] if outputs is None else [o + [h] for o, h in zip(outputs, host)]
        )
    return [np.concatenate(o) for o in outputs]


def predict(
    predict_fn: Callable, variables: dict, images: np.ndarray, batch_size: int, mesh
) -> np.ndarray:
    """Logits for every image, in order, as numpy [N, num_classes].

    The last batch is padded to full size, so one compiled program serves every batch, and the
    padding is dropped from the result. Every process passes the same `images`.
    """
    sharding.check_batch_size(batch_size, "eval batch")
    if len(images) == 0:
        return np.zeros((0, 0), np.float32)
    return batched_apply(predict_fn, variables, (images,), batch_size, mesh)[0]
