"""The variation sampler: embedding, the whole DDIM loop and decoding in one jitted program.

The per-device program is written for one device's rows and mapped over the mesh with
jax.shard_map, so every device runs exactly the program a single device would: outputs are
bit-identical across device counts at the same per-device batch. Each image's randomness is
folded from its global index, so its variation does not depend on batching or resume point.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxclean.augment import corrupt_images, normalize
from jaxclean.checks import ConfigError
from jaxclean.sharding import DATA_AXIS

# The stream of each image's key that draws its condition's corruption; the step noise uses
# streams 0..steps, so turning the corruption on leaves every other draw as it was.
_CONDITION_STREAM = 2**31 - 1


class SamplerError(ConfigError):
    """Sampler settings that cannot be run."""


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How variations are drawn.

    Attributes:
      steps: DDIM steps over the full schedule (with strength < 1, only the last
        int(steps * strength) of them run).
      eta: 0 for deterministic DDIM, 1 for DDPM-like noise.
      guidance: classifier-free guidance scale; 1 skips the unconditional branch.
      strength: 1.0 starts from pure noise (the method); below 1 the source latent is noised
        to that fraction of the schedule and denoised back (SDEdit, a baseline).
      color_transfer: match each variation's per-channel mean and std to its source.
      condition_corruption: the probability that the encoder reads a randomly corrupted copy
        of the source (augment.corrupt_image, drawn from the image's own key) instead of the
        source: randomised smoothing of the condition. A small overlay that moves the
        embedding one way then hides among the random moves every image gets, and a
        generator trained on such conditions (generator.condition_corruption) renders a clean
        image from them. The output pixels never see the corrupted copy.
      condition_neighbours: 0 conditions on the source's own tokens; k > 0 on the mean of the
        k nearest rows of a codebook of trusted images' tokens (params["condition_codebook"],
        made by `condition_codebook`). The condition is then always made of clean images'
        conditions, and a trigger can act only through which neighbours it picks (and through
        the source's statistics, where color_transfer is on).
      neighbours_same_label: pick the neighbours among the codebook rows of the row's own
        label only (params["codebook_labels"]).
    """

    steps: int = 20
    eta: float = 0.0
    guidance: float = 7.5
    strength: float = 1.0
    color_transfer: bool = True
    condition_corruption: float = 0.0
    condition_neighbours: int = 0
    neighbours_same_label: bool = False

    def __post_init__(self):
        if self.steps < 1:
            raise SamplerError(f"sampler steps must be at least 1, got {self.steps}")
        if not 0.0 < self.strength <= 1.0:
            raise SamplerError(f"strength {self.strength} must be in (0, 1]")
        if self.eta < 0:
            raise SamplerError(f"eta {self.eta} must be >= 0")
        if self.guidance < 1.0:
            raise SamplerError(f"guidance {self.guidance} must be >= 1")
        if not 0.0 <= self.condition_corruption <= 1.0:
            raise SamplerError(
                f"condition_corruption {self.condition_corruption} must be in [0, 1]"
            )
        if self.condition_neighbours < 0:
            raise SamplerError(
                f"condition_neighbours {self.condition_neighbours} must be >= 0 (0: off)"
            )
        if self.neighbours_same_label and not self.condition_neighbours:
            raise SamplerError("neighbours_same_label needs condition_neighbours > 0")

    @classmethod
    def from_config(cls, config) -> SamplerSettings:
        """config.regenerate's sampler settings; a ConfigError naming the field when one is
        bad."""
        try:
            return cls(
                steps=config.steps,
                eta=config.eta,
                guidance=config.guidance,
                strength=config.strength,
                color_transfer=config.color_transfer,
                condition_corruption=config.condition_corruption,
                condition_neighbours=config.condition_neighbours,
                neighbours_same_label=config.neighbours_same_label,
            )
        except SamplerError as e:
            raise ConfigError(f"regenerate: {e}") from e


def ddim_timesteps(num_train_timesteps: int, steps: int, strength: float, steps_offset: int = 0):
    """The timesteps DDIM visits, and the one after each, as diffusers' "leading" spacing.

    Returns:
      (timesteps, previous) int32 arrays, highest noise first; previous < 0 means "done".
    """
    if steps > num_train_timesteps:
        raise SamplerError(f"{steps} steps exceed the {num_train_timesteps} training timesteps")
    ratio = num_train_timesteps // steps
    timesteps = (np.arange(steps) * ratio)[::-1] + steps_offset
    run = min(int(steps * strength), steps)
    if run < 1:
        raise SamplerError(f"strength {strength} with {steps} steps runs no step")
    timesteps = timesteps[steps - run :]
    return timesteps.astype(np.int32), (timesteps - ratio).astype(np.int32)


def ddim_update(latents, noise_pred, alpha_t, alpha_prev, eta, noise):
    """x_{t-1} from x_t (Song et al. 2021, eq. 12), with sigma scaled by eta."""
    original = (latents - jnp.sqrt(1.0 - alpha_t) * noise_pred) / jnp.sqrt(alpha_t)
    variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)
    sigma = eta * jnp.sqrt(variance)
    direction = jnp.sqrt(jnp.clip(1.0 - alpha_prev - sigma**2, 0.0)) * noise_pred
    return jnp.sqrt(alpha_prev) * original + direction + sigma * noise


def color_transfer(variation, source, eps: float = 1e-5):
    """Per image and channel, give `variation` the mean and std of `source` (both [-1, 1])."""
    axes = (1, 2)
    v_mean, v_std = variation.mean(axes, keepdims=True), variation.std(axes, keepdims=True)
    s_mean, s_std = source.mean(axes, keepdims=True), source.std(axes, keepdims=True)
    return (variation - v_mean) / (v_std + eps) * s_std + s_mean


def corrupt_sources(images, keys, probability: float):
    """uint8 copies of uint8 `images`, each corrupted with `probability` from its own key."""
    corrupted = corrupt_images(normalize(images), keys, _CONDITION_STREAM, probability)
    return jnp.round((corrupted + 1.0) * 127.5).astype(jnp.uint8)


def nearest_conditions(context, labels, codebook, codebook_labels, neighbours, same_label):
    """Each row's tokens [B, T, D] replaced by the mean of its `neighbours` nearest codebook
    rows [N, T * D] (squared L2 over the flattened tokens), among rows of its own label when
    `same_label`."""
    flat = context.reshape(context.shape[0], -1)
    cross = jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
    distances = jnp.sum(codebook**2, 1)[None] - 2.0 * cross
    if same_label:
        distances = jnp.where(labels[:, None] == codebook_labels[None], distances, jnp.inf)
    _, nearest = jax.lax.top_k(-distances, neighbours)
    return codebook[nearest].mean(1).reshape(context.shape)


def condition_codebook(model, params, images, labels, batch: int) -> dict:
    """{"condition_codebook": [N, T * D], "codebook_labels": [N]}: the conditional tokens of
    uint8 `images` (a trusted split), to add to the sampler's params."""
    conditions = jax.jit(lambda p, x, y: model.conditions(p, x, y)[0])
    rows = [
        np.asarray(conditions(params, images[i : i + batch], labels[i : i + batch]))
        for i in range(0, len(images), batch)
    ]
    tokens = np.concatenate(rows).astype(np.float32)
    return {
        "condition_codebook": tokens.reshape(len(tokens), -1),
        "codebook_labels": np.asarray(labels, np.int32),
    }


def _normal(keys, shape):
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def sample_keys(rng, indices):
    """Each image's key, folded from its global index: independent of batching."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(indices)


def initial_noise(rng, indices, latent_shape):
    """The starting latents' noise of images `indices` (what a reference pipeline is given)."""
    return _step_noise(sample_keys(rng, indices), 0, latent_shape)


def _step_noise(keys, step, latent_shape):
    """Noise number `step` of each image (0: the start; i + 1: DDIM step i, when eta > 0)."""
    return _normal(jax.vmap(lambda k: jax.random.fold_in(k, step))(keys), latent_shape)


def make_variation_fn(model, settings: SamplerSettings):
    """The per-device function (params, uint8 images, indices, labels, key) -> uint8 images.

    `model` is any generator with the sampler's interface (see LatentDiffusion): conditions,
    encode_source, predict_noise, decode_latents, latent_shape, alphas_cumprod, steps_offset
    and final_alpha_cumprod.
    """
    alphas = np.asarray(model.alphas_cumprod, np.float32)
    timesteps, previous = ddim_timesteps(
        len(alphas), settings.steps, settings.strength, model.steps_offset
    )
    guided = settings.guidance != 1.0

    def variations(params, images, indices, labels, rng):
        keys = sample_keys(rng, indices)
        source = normalize(images)
        alphas_j = jnp.asarray(alphas)
        read = images
        if settings.condition_corruption > 0:
            read = corrupt_sources(images, keys, settings.condition_corruption)
        context, null = model.conditions(params, read, labels)
        if settings.condition_neighbours:
            context = nearest_conditions(
                context,
                labels,
                params["condition_codebook"],
                params["codebook_labels"],
                settings.condition_neighbours,
                settings.neighbours_same_label,
            )
        if guided:
            context = jnp.concatenate([null, context])
        start_noise = _step_noise(keys, 0, model.latent_shape)
        if settings.strength < 1.0:
            alpha0 = alphas_j[timesteps[0]]
            latents = (
                jnp.sqrt(alpha0) * model.encode_source(params, source)
                + jnp.sqrt(1.0 - alpha0) * start_noise
            )
        else:
            latents = start_noise

        def body(i, latents):
            t, prev = jnp.asarray(timesteps)[i], jnp.asarray(previous)[i]
            t_batch = jnp.full((latents.shape[0] * (2 if guided else 1),), t, jnp.int32)
            model_in = jnp.concatenate([latents, latents]) if guided else latents
            noise_pred = model.predict_noise(params, model_in, t_batch, context)
            if guided:
                uncond, cond = jnp.split(noise_pred, 2)
                noise_pred = uncond + settings.guidance * (cond - uncond)
            alpha_prev = jnp.where(
                prev >= 0, alphas_j[jnp.maximum(prev, 0)], model.final_alpha_cumprod
            )
            step_noise = (
                _step_noise(keys, i + 1, model.latent_shape)
                if settings.eta > 0
                else jnp.zeros_like(latents)
            )
            return ddim_update(
                latents, noise_pred, alphas_j[t], alpha_prev, settings.eta, step_noise
            )

        latents = jax.lax.fori_loop(0, len(timesteps), body, latents)
        out = model.decode_latents(params, latents)
        if settings.color_transfer:
            out = jnp.clip(color_transfer(out, source), -1.0, 1.0)
        return jnp.round((out + 1.0) * 127.5).astype(jnp.uint8)

    return variations


def make_sampler(model, settings: SamplerSettings, mesh):
    """Jitted sampler over `mesh`: rows split along "data", parameters replicated."""
    per_device = make_variation_fn(model, settings)
    mapped = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P()),
        out_specs=P(DATA_AXIS),
        check_vma=False,
    )
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    return jax.jit(
        mapped,
        in_shardings=(replicated, rows, rows, rows, replicated),
        out_shardings=rows,
    )
