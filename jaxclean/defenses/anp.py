"""Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021): the neurons a backdoor lives in are
those whose small perturbation changes the output most. Each batch-norm channel k gets a mask
m_k in [0, 1]; its scale is used as gamma_k (m_k + delta_k) and its bias as beta_k (1 + xi_k),
with (delta, xi) an adversarial perturbation of size eps. The masks are learnt on clean data
against the perturbation; channels whose mask ends below a threshold are pruned."""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxclean.augment import normalize, sample_keys
from jaxclean.steps import cross_entropy


def batch_norm_paths(params: dict) -> list[tuple]:
    """The paths of every batch-norm layer's parameters (a "scale" beside a "bias")."""
    flat = flatten_dict(params)
    return sorted(
        path[:-1] for path in flat if path[-1] == "scale" and path[:-1] + ("bias",) in flat
    )


def neuron_masks(params: dict) -> dict:
    """One mask per batch-norm channel, all 1: {path: [C]}."""
    flat = flatten_dict(params)
    return {"/".join(p): jnp.ones_like(flat[p + ("scale",)]) for p in batch_norm_paths(params)}


def masked_params(params: dict, masks: dict, delta: dict | None = None, xi: dict | None = None):
    """`params` with each channel's scale times (mask + delta) and bias times (1 + xi)."""
    flat = dict(flatten_dict(params))
    for key, mask in masks.items():
        path = tuple(key.split("/"))
        coefficient = mask if delta is None else mask + delta[key]
        flat[path + ("scale",)] = flat[path + ("scale",)] * coefficient
        if xi is not None:
            flat[path + ("bias",)] = flat[path + ("bias",)] * (1.0 + xi[key])
    return unflatten_dict(flat)


def pruned_params(params: dict, masks: dict, threshold: float) -> dict:
    """Channels whose mask is below `threshold` get a zero scale; the others are untouched."""
    binary = {key: (mask >= threshold).astype(mask.dtype) for key, mask in masks.items()}
    return masked_params(params, binary)


class ANPState(flax.struct.PyTreeNode):
    """The masks being learnt, their optimizer, and the step."""

    step: jax.Array
    masks: dict
    opt_state: optax.OptState
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, masks: dict, learning_rate: float, momentum: float = 0.9):
        tx = optax.sgd(learning_rate, momentum=momentum)
        return cls(jnp.zeros((), jnp.int32), masks, tx.init(masks), tx)


def anp_step(
    state: ANPState,
    model_variables: dict,
    batch: dict,
    rng: jax.Array,
    *,
    apply_fn: Callable,
    eps: float,
    steps: int,
    alpha: float,
):
    """One mask update: a random perturbation in [-eps, eps], `steps` ascent steps on it, then
    descent on alpha * L(masks) + (1 - alpha) * L(masks, perturbation), masks clipped to
    [0, 1]. Batch norm uses the model's running statistics throughout.
    """
    images = normalize(batch["image"])
    labels = batch["label"]
    params = model_variables["params"]
    stats = model_variables["batch_stats"]
    key = jax.random.fold_in(rng, state.step)
    keys = sample_keys(key, jnp.arange(2 * len(state.masks)))

    def loss(masks, delta=None, xi=None):
        variables = {"params": masked_params(params, masks, delta, xi), "batch_stats": stats}
        return cross_entropy(apply_fn(variables, images, train=False), labels)

    names = sorted(state.masks)
    delta = {
        n: jax.random.uniform(keys[2 * i], state.masks[n].shape, minval=-eps, maxval=eps)
        for i, n in enumerate(names)
    }
    xi = {
        n: jax.random.uniform(keys[2 * i + 1], state.masks[n].shape, minval=-eps, maxval=eps)
        for i, n in enumerate(names)
    }
    ascent = eps / steps

    def climb(value, grad):
        return jnp.clip(value + ascent * grad, -eps, eps)

    for _ in range(steps):
        grad_delta, grad_xi = jax.grad(loss, argnums=(1, 2))(state.masks, delta, xi)
        delta = jax.tree.map(climb, delta, grad_delta)
        xi = jax.tree.map(climb, xi, grad_xi)
    delta, xi = jax.lax.stop_gradient(delta), jax.lax.stop_gradient(xi)

    def objective(masks):
        natural = loss(masks)
        robust = loss(masks, delta, xi)
        return alpha * natural + (1.0 - alpha) * robust, (natural, robust)

    (total, (natural, robust)), grads = jax.value_and_grad(objective, has_aux=True)(state.masks)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.masks)
    masks = jax.tree.map(lambda m: jnp.clip(m, 0.0, 1.0), optax.apply_updates(state.masks, updates))
    new_state = state.replace(step=state.step + 1, masks=masks, opt_state=opt_state)
    return new_state, {
        "loss": total,
        "natural_loss": natural,
        "perturbed_loss": robust,
        "mean_mask": jnp.mean(jnp.concatenate([m.ravel() for m in masks.values()])),
    }
