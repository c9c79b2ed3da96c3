"""Neural Attention Distillation (Li et al., ICLR 2021): the backdoored model fine-tuned on clean
data while its attention maps are pulled to those of a model fine-tuned on the same data."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxclean.augment import Augment, augment_images, normalize, sample_keys
from jaxclean.steps import TrainState, cross_entropy, step_metrics


def attention_map(activations: jax.Array, power: float) -> jax.Array:
    """[B, H, W, C] -> [B, H*W]: the channels' mean of |a|^power, L2-normalised per image."""
    maps = jnp.mean(jnp.abs(activations) ** power, axis=-1).reshape(activations.shape[0], -1)
    return maps / jnp.maximum(jnp.linalg.norm(maps, axis=1, keepdims=True), 1e-12)


def attention_loss(student: tuple, teacher: tuple, betas: tuple, power: float) -> jax.Array:
    """sum_i beta_i * mean((a_i(student) - a_i(teacher))^2) over the stages given betas for."""
    return sum(
        beta * jnp.mean((attention_map(s, power) - attention_map(t, power)) ** 2)
        for beta, s, t in zip(betas, student, teacher, strict=True)
    )


def nad_step(
    state: TrainState,
    teacher_variables: dict,
    batch: dict,
    rng: jax.Array,
    *,
    teacher_apply: Callable,
    augment: Augment,
    betas: tuple,
    power: float,
):
    """One step: cross-entropy plus the attention loss against the (frozen) attention teacher.

    Args:
      state: the student, started from the backdoored model.
      teacher_variables: the attention teacher (the backdoored model fine-tuned on clean data).
      batch, rng: as for `steps.train_step`.
      teacher_apply: the teacher's apply function (static).
      augment: static augmentation settings, applied once and fed to both networks.
      betas: one weight per stage, last stages last (static).
      power: p of the attention maps (static).
    """
    images = augment_images(normalize(batch["image"]), sample_keys(rng, batch["index"]), augment)
    _, teacher_stages = teacher_apply(teacher_variables, images, train=False, output="stages")
    teacher_stages = jax.lax.stop_gradient(teacher_stages[-len(betas) :])

    def loss_fn(params):
        (logits, stages), updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            output="stages",
            mutable=["batch_stats"],
        )
        attention = attention_loss(stages[-len(betas) :], teacher_stages, betas, power)
        ce = cross_entropy(logits, batch["label"])
        return ce + attention, (logits, updates["batch_stats"], attention)

    (loss, (logits, batch_stats, attention)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    new_state = state.apply_gradients(grads, batch_stats)
    metrics = step_metrics(loss, logits, batch["label"], grads, state.params)
    metrics["attention_loss"] = attention
    return new_state, metrics
