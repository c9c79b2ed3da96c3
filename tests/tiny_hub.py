"""Tiny random Stable Diffusion components, written as the hub lays them out (for tests).

The weights go through hub.flax_to_pytorch into safetensors, so loading them exercises the same
PyTorch-layout conversion that real hub weights take.
"""

import json
import os

import jax
from safetensors.numpy import save_file

from jaxclean.diffusion import adapter, hub

TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=30,
    patch_size=15,
    projection_dim=16,
)
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=16,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64],
    layers_per_block=1,
    latent_channels=4,
    sample_size=16,
    scaling_factor=0.18215,
)
SCHEDULER = dict(
    _class_name="DDIMScheduler",
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
CLIP_PROCESSOR = dict(
    crop_size=30,
    size=30,
    do_normalize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
)
TINY_RESOLUTION = 16  # Generation size: the VAE halves it once, to the UNet's 8x8.


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def _write_component(root, name, config, params, naming, weights_file):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    _write_json(os.path.join(root, name, "config.json"), config)
    save_file(hub.flax_to_pytorch(params, naming), os.path.join(root, name, weights_file))


def write_tiny_sd_image_variations(root: str, seed: int = 0) -> str:
    keys = jax.random.split(jax.random.key(seed), 3)
    unet = adapter.unet_from_config(TINY_UNET)
    vae = adapter.vae_from_config(TINY_VAE)
    clip = adapter.make_clip_image_encoder(TINY_CLIP)
    unet_params = adapter.init_unet(unet, keys[0], (8, 8, 4), 1)
    vae_params = adapter.init_vae(vae, keys[1], (16, 16, 3))
    clip_params = adapter.init_clip_image_encoder(clip, keys[2])
    model_file = "diffusion_pytorch_model.safetensors"
    _write_component(root, "unet", TINY_UNET, unet_params, "diffusers", model_file)
    _write_component(root, "vae", TINY_VAE, vae_params, "diffusers", model_file)
    clip_config = dict(TINY_CLIP, model_type="clip_vision_model")
    _write_component(
        root, "image_encoder", clip_config, clip_params, "transformers", "model.safetensors"
    )
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    _write_json(os.path.join(root, "scheduler", "scheduler_config.json"), SCHEDULER)
    os.makedirs(os.path.join(root, "feature_extractor"), exist_ok=True)
    _write_json(os.path.join(root, "feature_extractor", "preprocessor_config.json"), CLIP_PROCESSOR)
    _write_json(
        os.path.join(root, "model_index.json"),
        {"_class_name": "StableDiffusionImageVariationPipeline"},
    )
    return root
