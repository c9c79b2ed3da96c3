"""Pretrained Stable Diffusion generators in Flax, behind the sampler's generator interface.

`sd_image_variations` has the architecture of lambdalabs/sd-image-variations-diffusers, the
kind of model the paper regenerates with: the source image goes through CLIP's vision tower and
projection, and that one embedding is the UNet's cross-attention context; generation starts
from pure noise, so no pixel of the source reaches the variation. The unconditional branch of
classifier-free guidance is the zero embedding, as in diffusers'
StableDiffusionImageVariationPipeline.

`sd_img2img` is SDEdit on a text-to-image SD 1.x model, as diffusers'
StableDiffusionImg2ImgPipeline: the source's latent is noised to `strength` of the schedule and
denoised back, guided by a prompt made from the image's class name (its label in the data,
which for a poisoned image is the attacker's target); the unconditional branch is the empty
prompt. Its output keeps the source's layout, so it is a baseline, not the method.

Weights come from a directory in the hub's layout (hub.py), read from safetensors.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxclean.diffusion import adapter, hub

SD_IMAGE_VARIATIONS_COMPONENTS = ("unet", "vae", "image_encoder", "feature_extractor", "scheduler")
SD_IMG2IMG_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
class LatentSD:
    """What both SD generators share: modules and static settings of the VAE, UNet and DDIM
    schedule. Parameters are a separate pytree (see the loaders)."""

    unet: object
    vae: object
    image_shape: tuple  # The data's; variations are resized back to it.
    resolution: int  # The generation size.
    latent_shape: tuple
    vae_scale: float
    alphas_cumprod: tuple
    final_alpha_cumprod: float
    steps_offset: int

    def encode_source(self, params: dict, source: jax.Array) -> jax.Array:
        mean, _ = adapter.encode(self.vae, params["vae"], resize(to_rgb(source), self.resolution))
        return mean * self.vae_scale

    def predict_noise(self, params: dict, latents, timesteps, context) -> jax.Array:
        out = adapter.predict_noise(self.unet, params["unet"], latents, timesteps, context)
        return out.astype(jnp.float32)  # DDIM's update stays in float32 under a bf16 UNet.

    def decode_latents(self, params: dict, latents) -> jax.Array:
        decoded = jnp.clip(adapter.decode(self.vae, params["vae"], latents / self.vae_scale), -1, 1)
        out = resize(decoded, self.image_shape[0])
        return jnp.clip(from_rgb(out, self.image_shape[-1]), -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class SDImageVariations(LatentSD):
    """Conditioned on the source's CLIP image embedding; generates from pure noise."""

    image_encoder: adapter.CLIPImageEncoder
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


@dataclasses.dataclass(frozen=True)
class SDImg2Img(LatentSD):
    """SD 1.x text-to-image parts; prompts are tokenized once, at load, one per class."""

    text_encoder: adapter.CLIPTextEncoder
    class_tokens: tuple  # [num_classes][max_length] token ids of each class's prompt.
    null_tokens: tuple  # The empty prompt's, for the unconditional branch.

    def conditions(self, params: dict, images_uint8, labels):
        del images_uint8  # The source enters through encode_source, not the condition.
        encode = functools.partial(self.text_encoder.apply, {"params": params["text_encoder"]})
        context = encode(jnp.asarray(self.class_tokens, jnp.int32)[labels])
        null = encode(jnp.asarray(self.null_tokens, jnp.int32)[None])
        return context, jnp.broadcast_to(null, context.shape)


def _load_latent_parts(root: str, image_shape, resolution: int, context_dim: int, dtype: str):
    """UNet and VAE modules, their parameters, and the fields every SD generator shares."""
    if image_shape[0] != image_shape[1]:
        raise hub.HubError(f"Stable Diffusion generators need square images, got {image_shape}")
    if dtype not in DTYPES:
        raise hub.HubError(f"generator dtype {dtype!r}: use one of {tuple(DTYPES)}")
    unet_config = hub.read_config(root, "unet")
    vae_config = hub.read_config(root, "vae")
    scheduler = hub.read_config(root, "scheduler", "scheduler_config.json")
    unet = adapter.unet_from_config(unet_config, DTYPES[dtype])
    vae = adapter.vae_from_config(vae_config)
    if unet.cross_attention_dim != context_dim:
        raise hub.HubError(
            f"unet cross_attention_dim {unet.cross_attention_dim} does not match its "
            f"conditioning encoder's width {context_dim}"
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
    }
    params = _read_params(root, inits)
    # Stored as the UNet computes: a bf16 SD UNet's replicated weights take half the memory.
    params["unet"] = jax.tree.map(lambda x: x.astype(DTYPES[dtype]), params["unet"])
    alphas = training_alphas(scheduler)
    fields = dict(
        unet=unet,
        vae=vae,
        image_shape=tuple(image_shape),
        resolution=resolution,
        latent_shape=(latent, latent, unet.in_channels),
        vae_scale=float(vae_config.get("scaling_factor", 0.18215)),
        alphas_cumprod=tuple(float(a) for a in alphas),
        final_alpha_cumprod=1.0 if scheduler.get("set_alpha_to_one", False) else float(alphas[0]),
        steps_offset=int(scheduler.get("steps_offset", 0)),
    )
    return fields, params


def _read_params(root: str, inits: dict) -> dict:
    like = {name: jax.eval_shape(init, jax.random.key(0)) for name, init in inits.items()}
    return {
        name: hub.pytorch_to_flax(hub.read_weights(root, name), like[name], name) for name in like
    }


def load_sd_image_variations(root: str, image_shape, resolution: int, dtype: str = "float32"):
    """(model, params) from a hub-layout directory; `resolution` is the generation size."""
    for component in SD_IMAGE_VARIATIONS_COMPONENTS:
        hub.component_dir(root, component)
    image_encoder = adapter.make_clip_image_encoder(hub.read_config(root, "image_encoder"))
    processor = hub.read_config(root, "feature_extractor", "preprocessor_config.json")
    fields, params = _load_latent_parts(
        root, image_shape, resolution, image_encoder.config.projection_dim, dtype
    )
    params.update(
        _read_params(
            root,
            {"image_encoder": functools.partial(adapter.init_clip_image_encoder, image_encoder)},
        )
    )
    model = SDImageVariations(
        image_encoder=image_encoder,
        clip_mean=tuple(processor.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
        clip_std=tuple(processor.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
        **fields,
    )
    return model, params


def class_prompts(template: str, class_names) -> list[str]:
    """One prompt per class, e.g. "a photo of a {}" -> "a photo of a dog"."""
    if "{}" not in template:
        raise hub.HubError(f"prompt template {template!r} has no {{}} for the class name")
    return [template.format(name) for name in class_names]


def tokenize(root: str, prompts) -> tuple[np.ndarray, int]:
    """Token ids as diffusers' SD pipelines make them: padded to the tokenizer's max length."""
    from transformers import CLIPTokenizer

    directory = hub.component_dir(root, "tokenizer")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise hub.HubError(f"cannot read the tokenizer in {directory}: {e}") from e
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids
    return ids.astype(np.int32), tokenizer.model_max_length


def load_sd_img2img(
    root: str, image_shape, resolution: int, class_names, prompt: str, dtype: str = "float32"
):
    """(model, params) of an SD 1.x text-to-image model, for SDEdit with class-name prompts."""
    for component in SD_IMG2IMG_COMPONENTS:
        hub.component_dir(root, component)
    text_config = hub.read_config(root, "text_encoder")
    text_encoder = adapter.make_clip_text_encoder(text_config)
    ids, max_length = tokenize(root, class_prompts(prompt, class_names) + [""])
    if max_length > text_encoder.config.max_position_embeddings:
        raise hub.HubError(
            f"tokenizer max length {max_length} exceeds the text encoder's "
            f"{text_encoder.config.max_position_embeddings} positions"
        )
    fields, params = _load_latent_parts(
        root, image_shape, resolution, text_encoder.config.hidden_size, dtype
    )
    params.update(
        _read_params(
            root, {"text_encoder": functools.partial(adapter.init_clip_text_encoder, text_encoder)}
        )
    )
    model = SDImg2Img(
        text_encoder=text_encoder,
        class_tokens=tuple(tuple(int(t) for t in row) for row in ids[:-1]),
        null_tokens=tuple(int(t) for t in ids[-1]),
        **fields,
    )
    return model, params
