"""The one module that touches diffusers' Flax classes (UNet, VAE, noise schedules).

diffusers marks its Flax classes deprecated and removed them in 0.40, so everything else in
jaxclean sees only the functions here, in NHWC, and this file is what a replacement (a linen
port of the same architectures) would swap out. The UNet and VAE are linen modules, so their
parameters are plain pytrees that Orbax checkpoints like any other.
"""

from __future__ import annotations

import functools
import logging
import types
import typing
import warnings

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class _DropFlaxDeprecation(logging.Filter):
    """diffusers logs its Flax deprecation at every trace of every block, burying real logs;
    the deprecation is why this module exists, so the message is dropped once here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Flax classes are deprecated" not in record.getMessage()


@functools.cache
def _diffusers():
    """diffusers' Flax classes, imported at first use: the import takes seconds, which a run
    refused for bad input should not wait for."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.get_logger("diffusers")  # Sets up the library's handler, if not yet.
    for handler in logging.getLogger("diffusers").handlers:
        handler.addFilter(_DropFlaxDeprecation())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import FlaxAutoencoderKL, FlaxDDPMScheduler, FlaxUNet2DConditionModel
    return types.SimpleNamespace(
        FlaxAutoencoderKL=FlaxAutoencoderKL,
        FlaxDDPMScheduler=FlaxDDPMScheduler,
        FlaxUNet2DConditionModel=FlaxUNet2DConditionModel,
    )


if typing.TYPE_CHECKING:
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPVisionConfig


def _flax_clip():
    """transformers' Flax CLIP module, imported only by the Stable Diffusion path.

    It exists only in transformers 4.x; the offline generator needs none of it, so an
    environment with transformers 5 (as GPU images ship) runs everything but that path.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Its Flax deprecation notice.
            from transformers.models.clip import modeling_flax_clip
    except ImportError as e:
        raise ImportError(
            "the Stable Diffusion path needs transformers' Flax CLIP, which only "
            f"transformers 4.x has (pip install 'transformers>=4.57,<5'): {e}"
        ) from e
    return modeling_flax_clip


# diffusers' Flax blocks normalise with 32-group GroupNorm: widths must be multiples of 32.
GROUP_NORM_GROUPS = 32


def _check_widths(widths, what: str) -> None:
    bad = [w for w in widths if w % GROUP_NORM_GROUPS]
    if bad:
        raise ValueError(f"{what} widths {tuple(widths)}: each must be a multiple of 32")


def make_unet(
    block_out_channels,
    layers_per_block: int,
    attention_head_dim: int,
    in_channels: int,
    sample_size: int,
    cross_attention_dim: int,
    attention_levels=None,
) -> FlaxUNet2DConditionModel:
    """A conditional UNet whose cross-attention reads the image-embedding tokens.

    Args:
      block_out_channels: width per resolution level.
      layers_per_block: residual blocks per level.
      attention_head_dim: per-head width of the attention layers.
      in_channels: latent channels (the UNet predicts noise of the same shape).
      sample_size: the latent side.
      cross_attention_dim: width of the conditioning tokens.
      attention_levels: per level, whether it has (self- and cross-) attention; default all
        but the highest resolution, which is where attention costs the most.
    """
    _check_widths(block_out_channels, "UNet")
    levels = len(block_out_channels)
    if sample_size % 2 ** (levels - 1):
        raise ValueError(f"latent size {sample_size} must be divisible by 2**{levels - 1}")
    if attention_levels is None:
        attention_levels = (False,) + (True,) * (levels - 1) if levels > 1 else (True,)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    return _diffusers().FlaxUNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=attention_head_dim,
        cross_attention_dim=cross_attention_dim,
    )


def make_vae(
    block_out_channels,
    layers_per_block: int,
    latent_channels: int,
    image_channels: int,
    image_size: int,
) -> FlaxAutoencoderKL:
    """A KL autoencoder; each level after the first halves the resolution."""
    _check_widths(block_out_channels, "VAE")
    return _diffusers().FlaxAutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        sample_size=image_size,
    )


def alphas_cumprod(num_train_timesteps: int, beta_schedule: str) -> np.ndarray:
    """The cumulative signal fractions of diffusers' DDPM/DDIM training schedule."""
    scheduler = _diffusers().FlaxDDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=0.00085,
        beta_end=0.012,
    )
    return np.asarray(scheduler.create_state().common.alphas_cumprod, np.float32)


def init_unet(unet: FlaxUNet2DConditionModel, rng, latent_shape, num_tokens: int) -> dict:
    sample = jnp.zeros((1, latent_shape[-1], *latent_shape[:2]), jnp.float32)
    context = jnp.zeros((1, num_tokens, unet.cross_attention_dim), jnp.float32)
    return unet.init(rng, sample, jnp.zeros((1,), jnp.int32), context)["params"]


def init_vae(vae: FlaxAutoencoderKL, rng, image_shape) -> dict:
    sample = jnp.zeros((1, image_shape[-1], *image_shape[:2]), jnp.float32)
    return vae.init({"params": rng, "gaussian": rng}, sample)["params"]


def predict_noise(unet, params, latents, timesteps, context) -> jnp.ndarray:
    """The UNet's noise prediction for NHWC latents."""
    out = unet.apply(
        {"params": params}, jnp.transpose(latents, (0, 3, 1, 2)), timesteps, context
    ).sample
    return jnp.transpose(out, (0, 2, 3, 1))


def encode(vae, params, images) -> tuple[jnp.ndarray, jnp.ndarray]:
    """NHWC images in [-1, 1] to the posterior's (mean, std), NHWC."""
    posterior = vae.apply(
        {"params": params}, jnp.transpose(images, (0, 3, 1, 2)), method=vae.encode
    ).latent_dist
    return posterior.mean, posterior.std


def decode(vae, params, latents) -> jnp.ndarray:
    """NHWC latents to NHWC images (about [-1, 1])."""
    out = vae.apply({"params": params}, latents, method=vae.decode).sample
    return jnp.transpose(out, (0, 2, 3, 1))


# ----------------------------------------------------------------------------- CLIP image encoder


class CLIPImageEncoder(nn.Module):
    """CLIP's vision tower and projection: the image embedding SD image variations conditions on.

    transformers 4.x has FlaxCLIPVisionModel but no vision-with-projection class, so the
    projection (PyTorch's `visual_projection`, a bias-free linear map) is added here. The
    submodule names match CLIPVisionModelWithProjection's, so its weights load by name.
    """

    config: CLIPVisionConfig

    def setup(self):
        self.vision_model = _flax_clip().FlaxCLIPVisionTransformer(self.config)
        self.visual_projection = nn.Dense(self.config.projection_dim, use_bias=False)

    def __call__(self, pixel_values):
        """NHWC pixels, CLIP-normalised, at the config's image_size -> [B, projection_dim]."""
        outputs = self.vision_model(pixel_values, deterministic=True, return_dict=False)
        return self.visual_projection(outputs[1])


def make_clip_image_encoder(config: dict) -> CLIPImageEncoder:
    """From an image_encoder/config.json (a CLIPVisionConfig's fields)."""
    return CLIPImageEncoder(_flax_clip().CLIPVisionConfig(**config))


def init_clip_image_encoder(encoder: CLIPImageEncoder, rng) -> dict:
    size = encoder.config.image_size
    pixels = jnp.zeros((1, size, size, encoder.config.num_channels), jnp.float32)
    return encoder.init(rng, pixels)["params"]


class CLIPTextEncoder(nn.Module):
    """CLIP's text tower: its last hidden states are SD 1.x's cross-attention context.

    Named as CLIPTextModel's `text_model`, so PyTorch weights load by name. Every position is
    attended (under CLIP's causal mask), as diffusers' pipelines run it.
    """

    config: CLIPTextConfig

    def setup(self):
        self.text_model = _flax_clip().FlaxCLIPTextTransformer(self.config)

    def __call__(self, input_ids):
        """[B, L] token ids -> [B, L, hidden_size]."""
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        outputs = self.text_model(
            input_ids, jnp.ones_like(input_ids), positions, deterministic=True, return_dict=False
        )
        return outputs[0]


def make_clip_text_encoder(config: dict) -> CLIPTextEncoder:
    """From a text_encoder/config.json (a CLIPTextConfig's fields)."""
    return CLIPTextEncoder(_flax_clip().CLIPTextConfig(**config))


def init_clip_text_encoder(encoder: CLIPTextEncoder, rng) -> dict:
    tokens = jnp.zeros((1, encoder.config.max_position_embeddings), jnp.int32)
    return encoder.init(rng, tokens)["params"]


# ----------------------------------------------------------------------------- from hub configs


def unet_from_config(config: dict, dtype=jnp.float32) -> FlaxUNet2DConditionModel:
    """The UNet a hub component's config.json describes (e.g. SD 1.x's unet/config.json).

    dtype: what the UNet computes in (bfloat16 roughly doubles an accelerator's throughput).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Hub configs carry PyTorch-only keys; those are dropped.
        return _diffusers().FlaxUNet2DConditionModel.from_config(config, dtype=dtype)


def vae_from_config(config: dict) -> FlaxAutoencoderKL:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _diffusers().FlaxAutoencoderKL.from_config(config)
