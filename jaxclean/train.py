"""Classifier training: the optimizer, sharded state, the jitted step wrapper and the loop.

The loop is thin: it draws batches in an order fixed by (seed, epoch), calls a step
(`jaxclean.steps`), logs, and checkpoints with Orbax so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclean import checkpointing, faults, sharding
from jaxclean.data import ImageDataset
from jaxclean.metrics import MetricWriter, progress
from jaxclean.steps import TrainState, predict_step

# ----------------------------------------------------------------------------- set-up


def make_optimizer(
    recipe, steps_per_epoch: int, lr_schedule: str = "step"
) -> tuple[optax.GradientTransformation, Callable]:
    """The optimizer and learning-rate schedule a recipe names.

    "step" decay multiplies the rate by `lr_decay_factor` at each epoch in `lr_decay_epochs`
    (the paper: Adam 1e-3, decay at epochs 30 and 50); "cosine" anneals it to 0 over the run
    (BackdoorBench's defenses).
    """
    if lr_schedule == "cosine":
        total = max(1, int(recipe.num_epochs * steps_per_epoch))
        schedule = optax.cosine_decay_schedule(recipe.learning_rate, total)
    elif lr_schedule == "step":
        boundaries = {
            int(epoch * steps_per_epoch): recipe.lr_decay_factor for epoch in recipe.lr_decay_epochs
        }
        schedule = optax.piecewise_constant_schedule(recipe.learning_rate, boundaries)
    else:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}: use step or cosine")
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


def start_from(state: TrainState, variables: dict, mesh) -> TrainState:
    """`state` with the parameters and batch statistics of trained `variables` (replicated on
    the mesh) and its optimizer state fresh for them."""
    placed = jax.device_put(variables, sharding.replicated(mesh))
    return state.replace(
        params=placed["params"],
        batch_stats=placed["batch_stats"],
        opt_state=jax.jit(state.tx.init, out_shardings=sharding.replicated(mesh))(placed["params"]),
    )


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
            faults.kill_point(f"{description}/checkpoint", done)  # The save still in flight.
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
