"""The pure training steps: cross-entropy (the teacher and the baselines), distillation (the
student), feature invariance (the generator's encoder), and inference.

Each is a module-level function of (state, [teacher,] batch, rng) with its settings bound by
keyword, so tests and benchmarks call them directly; `jaxclean.train.jit_step` jits them with
the state donated and the batch sharded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclean.augment import (
    INVARIANCE_COPY_STREAM,
    STUDENT_CORRUPTION_STREAM,
    Augment,
    augment_images,
    corrupt_images,
    normalize,
    sample_keys,
)


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


def step_metrics(loss, logits, labels, grads, params) -> dict:
    return {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
    }


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    augment: Augment,
    objective: Callable | None = None,
):
    """One cross-entropy step: the teacher's, and every baseline trained without distillation.

    Args:
      state: the classifier.
      batch: {"image": uint8 [B, H, W, C], "label": int32 [B], "index": int [B]}.
      rng: this epoch's key; each sample's augmentation key folds in its index.
      augment: static augmentation settings.
      objective: what is minimised, as a function of the batch's mean cross-entropy (static;
        None: the cross-entropy itself). Anti-Backdoor Learning holds it at a flood level,
        then ascends it.

    Returns:
      The updated state and a dict of scalar metrics (with an objective, "cross_entropy" too).
    """
    images = augment_images(normalize(batch["image"]), sample_keys(rng, batch["index"]), augment)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        ce = cross_entropy(logits, batch["label"])
        loss = ce if objective is None else objective(ce)
        return loss, (logits, updates["batch_stats"], ce)

    (loss, (logits, batch_stats, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    new_state = state.apply_gradients(grads, batch_stats)
    metrics = step_metrics(loss, logits, batch["label"], grads, state.params)
    if objective is not None:
        metrics["cross_entropy"] = ce
    return new_state, metrics


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
    metrics = step_metrics(loss, logits, labels, grads, state.params)
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
    metrics = step_metrics(loss, logits, batch["label"], grads, state.params)
    metrics["teacher_agreement"] = jnp.mean(
        jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)
    )
    return new_state, metrics


def predict_step(apply_fn: Callable, variables: dict, images: jax.Array) -> jax.Array:
    """Logits in inference mode (running batch-norm statistics)."""
    return apply_fn(variables, normalize(images), train=False)
