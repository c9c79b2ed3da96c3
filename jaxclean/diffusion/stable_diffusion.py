"""Pretrained Stable Diffusion generators in Flax, behind the sampler's generator interface.

`sd_image_variations` has the architecture of lambdalabs/sd-image-variations-diffusers, the
kind of model the paper regenerates with: the source image goes through CLIP's vision tower and
projection, and that one embedding is the UNet's cross-attention context; generation starts
from pure noise, so no pixel of the source reaches the variation. The unconditional branch of
classifier-free guidance is the zero embedding, as in diffusers'
StableDiffusionImageVariationPipeline.

Weights come from a directory in the hub's layout (hub.py): unet/, vae/, image_encoder/,
feature_extractor/ and scheduler/, read from safetensors.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxclean.diffusion import adapter, hub

SD_IMAGE_VARIATIONS_COMPONENTS = ("unet", "vae", "image_encoder", "feature_extractor", "scheduler")


def to_rgb(images: jax.Array) -> jax.Array:
    return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def from_rgb(images: jax.Array, channels: int) -> jax.Array:
    return images.mean(-1, keepdims=True) if channels == 1 else images


def resize(images: jax.Array, size: int) -> jax.Array:
    """Square resize; a no-op at the same size (so equal-size inputs pass through exactly)."""
    if images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "cubic")


def training_alphas(scheduler_config: dict) -> np.ndarray:
    """alphas_cumprod of a diffusers scheduler config (SD 1.x: scaled_linear, 0.00085-0.012)."""
    schedule = scheduler_config.get("beta_schedule", "scaled_linear")
    steps = scheduler_config.get("num_train_timesteps", 1000)
    start = scheduler_config.get("beta_start", 0.00085)
    end = scheduler_config.get("beta_end", 0.012)
    if schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    elif schedule == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float64)
    else:
        raise hub.HubError(f"scheduler beta_schedule {schedule!r} is not supported")
    return np.cumprod(1.0 - betas).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SDImageVariations:
    """Modules and static settings; the parameters are a separate pytree (see load)."""

    unet: object
    vae: object
    image_encoder: adapter.CLIPImageEncoder
    image_shape: tuple
    resolution: int
    latent_shape: tuple
    vae_scale: float
    alphas_cumprod: tuple
    final_alpha_cumprod: float
    steps_offset: int
    clip_mean: tuple
    clip_std: tuple

    def conditions(self, params: dict, images_uint8, labels):
        del labels  # The image embedding alone conditions, as in the paper.
        pixels = resize(to_rgb(images_uint8.astype(jnp.float32) / 255.0), self.clip_size)
        pixels = (pixels - jnp.asarray(self.clip_mean)) / jnp.asarray(self.clip_std)
        embedding = self.image_encoder.apply({"params": params["image_encoder"]}, pixels)
        embedding = embedding[:, None, :]
        return embedding, jnp.zeros_like(embedding)

    @property
    def clip_size(self) -> int:
        return self.image_encoder.config.image_size

    def encode_source(self, params: dict, source: jax.Array) -> jax.Array:
        mean, _ = adapter.encode(self.vae, params["vae"], resize(to_rgb(source), self.resolution))
        return mean * self.vae_scale

    def predict_noise(self, params: dict, latents, timesteps, context) -> jax.Array:
        return adapter.predict_noise(self.unet, params["unet"], latents, timesteps, context)

    def decode_latents(self, params: dict, latents) -> jax.Array:
        decoded = jnp.clip(adapter.decode(self.vae, params["vae"], latents / self.vae_scale), -1, 1)
        out = resize(decoded, self.image_shape[0])
        return jnp.clip(from_rgb(out, self.image_shape[-1]), -1.0, 1.0)


def load_sd_image_variations(root: str, image_shape, resolution: int):
    """(model, params) from a hub-layout directory; `resolution` is the generation size."""
    for component in SD_IMAGE_VARIATIONS_COMPONENTS:
        hub.component_dir(root, component)
    if image_shape[0] != image_shape[1]:
        raise hub.HubError(f"sd_image_variations needs square images, got {tuple(image_shape)}")
    unet_config = hub.read_config(root, "unet")
    vae_config = hub.read_config(root, "vae")
    clip_config = hub.read_config(root, "image_encoder")
    scheduler = hub.read_config(root, "scheduler", "scheduler_config.json")
    processor = hub.read_config(root, "feature_extractor", "preprocessor_config.json")
    unet = adapter.unet_from_config(unet_config)
    vae = adapter.vae_from_config(vae_config)
    image_encoder = adapter.make_clip_image_encoder(clip_config)
    if unet.cross_attention_dim != image_encoder.config.projection_dim:
        raise hub.HubError(
            f"unet cross_attention_dim {unet.cross_attention_dim} does not match the image "
            f"encoder's projection_dim {image_encoder.config.projection_dim}"
        )
    downsample = 2 ** (len(vae.block_out_channels) - 1)
    if resolution % (downsample * 2 ** (len(unet.block_out_channels) - 1)):
        raise hub.HubError(f"generation resolution {resolution} does not fit the UNet's levels")
    latent = resolution // downsample
    inits = {  # Shapes only (eval_shape): a full SD UNet is never initialised for nothing.
        "unet": functools.partial(
            adapter.init_unet, unet, latent_shape=(latent, latent, unet.in_channels), num_tokens=1
        ),
        "vae": functools.partial(
            adapter.init_vae, vae, image_shape=(resolution, resolution, vae.in_channels)
        ),
        "image_encoder": functools.partial(adapter.init_clip_image_encoder, image_encoder),
    }
    like = {name: jax.eval_shape(init, jax.random.key(0)) for name, init in inits.items()}
    params = {
        name: hub.pytorch_to_flax(hub.read_weights(root, name), like[name], name) for name in like
    }
    alphas = training_alphas(scheduler)
    model = SDImageVariations(
        unet=unet,
        vae=vae,
        image_encoder=image_encoder,
        image_shape=tuple(image_shape),
        resolution=resolution,
        latent_shape=(latent, latent, unet.in_channels),
        vae_scale=float(vae_config.get("scaling_factor", 0.18215)),
        alphas_cumprod=tuple(float(a) for a in alphas),
        final_alpha_cumprod=1.0 if scheduler.get("set_alpha_to_one", False) else float(alphas[0]),
        steps_offset=int(scheduler.get("steps_offset", 0)),
        clip_mean=tuple(processor.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
        clip_std=tuple(processor.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
    )
    return model, params
