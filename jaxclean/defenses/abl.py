"""Anti-Backdoor Learning (Li et al., NeurIPS 2021): poisoned samples are learnt faster than
clean ones, so a model trained with local gradient ascent (its loss held at a flood level) fits
them first; the lowest-loss share of the training set is isolated, the model trained on the
rest, then made to unlearn the isolated share by gradient ascent."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclean import train
from jaxclean.augment import Augment, normalize
from jaxclean.steps import TrainState, train_step


def flooded(loss: jax.Array, flood: float) -> jax.Array:
    """|loss - flood| + flood: gradient descent above the flood level, ascent below it
    (BackdoorBench's "Flooding" form of the local gradient ascent)."""
    return jnp.abs(loss - flood) + flood


def isolation_step(state: TrainState, batch, rng, *, augment: Augment, flood: float):
    """One step of the isolation phase: cross-entropy held at the flood level."""
    objective = functools.partial(flooded, flood=flood)
    return train_step(state, batch, rng, augment=augment, objective=objective)


def _ascent(loss: jax.Array) -> jax.Array:
    return -loss


def unlearning_step(state: TrainState, batch, rng, *, augment: Augment):
    """One step of the unlearning phase: gradient ascent on the isolated samples."""
    return train_step(state, batch, rng, augment=augment, objective=_ascent)


def per_sample_losses(apply_fn, variables, images, labels, batch_size: int, mesh) -> np.ndarray:
    """Each sample's cross-entropy under the model in inference mode, in order."""

    @jax.jit
    def losses(variables, images, labels):
        logits = apply_fn(variables, normalize(images), train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    arrays = (images, np.asarray(labels, np.int32))
    return train.batched_apply(losses, variables, arrays, batch_size, mesh)[0]


def isolate(losses: np.ndarray, ratio: float) -> np.ndarray:
    """The indices of the ceil(ratio x N) lowest losses, sorted: the suspected poison."""
    count = int(np.ceil(ratio * len(losses)))
    return np.sort(np.argsort(losses, kind="stable")[:count])
