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
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
)
TINY_MAX_LENGTH = 16  # The tokenizer pads every prompt to this many tokens.


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def _write_component(root, name, config, params, naming, weights_file):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    _write_json(os.path.join(root, name, "config.json"), config)
    save_file(hub.flax_to_pytorch(params, naming), os.path.join(root, name, weights_file))


def _write_unet_vae_scheduler(
    root, key, cross_attention_dim, unet_config=TINY_UNET, vae_config=TINY_VAE, resolution=16
):
    keys = jax.random.split(key)
    unet_config = dict(unet_config, cross_attention_dim=cross_attention_dim)
    unet = adapter.unet_from_config(unet_config)
    vae = adapter.vae_from_config(vae_config)
    model_file = "diffusion_pytorch_model.safetensors"
    latent = resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    unet_params = adapter.init_unet(unet, keys[0], (latent, latent, 4), 1)
    _write_component(root, "unet", unet_config, unet_params, "diffusers", model_file)
    del unet_params  # An SD-size UNet is GBs: gone before the next component is made.
    vae_params = adapter.init_vae(vae, keys[1], (resolution, resolution, 3))
    _write_component(root, "vae", vae_config, vae_params, "diffusers", model_file)
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    _write_json(os.path.join(root, "scheduler", "scheduler_config.json"), SCHEDULER)


def write_tiny_sd_image_variations(root: str, seed: int = 0, clip_size: int = 30) -> str:
    """clip_size: the image encoder's input side (patches of half that)."""
    clip_config = dict(TINY_CLIP, image_size=clip_size, patch_size=clip_size // 2)
    return write_sd_image_variations(root, TINY_UNET, TINY_VAE, clip_config, TINY_RESOLUTION, seed)


def write_sd_image_variations(root, unet_config, vae_config, clip_config, resolution, seed=0):
    """Random weights of any size in lambdalabs/sd-image-variations-diffusers' layout."""
    keys = jax.random.split(jax.random.key(seed))
    _write_unet_vae_scheduler(
        root, keys[0], clip_config["projection_dim"], unet_config, vae_config, resolution
    )
    clip_size = clip_config["image_size"]
    clip = adapter.make_clip_image_encoder(clip_config)
    clip_params = adapter.init_clip_image_encoder(clip, keys[1])
    _write_component(
        root,
        "image_encoder",
        dict(clip_config, model_type="clip_vision_model"),
        clip_params,
        "transformers",
        "model.safetensors",
    )
    os.makedirs(os.path.join(root, "feature_extractor"), exist_ok=True)
    _write_json(
        os.path.join(root, "feature_extractor", "preprocessor_config.json"),
        dict(CLIP_PROCESSOR, crop_size=clip_size, size=clip_size),
    )
    _write_json(
        os.path.join(root, "model_index.json"),
        {"_class_name": "StableDiffusionImageVariationPipeline"},
    )
    return root


def _write_tiny_tokenizer(directory: str) -> dict:
    """A CLIP BPE tokenizer with no merges: every character is a token, the last of a word
    with CLIP's end-of-word mark. Returns the special tokens' ids."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    characters = list(bytes_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    os.makedirs(directory, exist_ok=True)
    _write_json(os.path.join(directory, "vocab.json"), vocab)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    _write_json(
        os.path.join(directory, "tokenizer_config.json"),
        {"model_max_length": TINY_MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"},
    )
    return dict(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


def write_tiny_sd_img2img(root: str, seed: int = 0) -> str:
    """A tiny text-to-image SD 1.x (CLIP text encoder and tokenizer, UNet, VAE, scheduler)."""
    keys = jax.random.split(jax.random.key(seed))
    _write_unet_vae_scheduler(root, keys[0], TINY_TEXT["hidden_size"])
    special = _write_tiny_tokenizer(os.path.join(root, "tokenizer"))
    text_config = dict(TINY_TEXT, **special)
    text_encoder = adapter.make_clip_text_encoder(text_config)
    text_params = adapter.init_clip_text_encoder(text_encoder, keys[1])
    _write_component(
        root,
        "text_encoder",
        dict(text_config, model_type="clip_text_model"),
        text_params,
        "transformers",
        "model.safetensors",
    )
    _write_json(
        os.path.join(root, "model_index.json"), {"_class_name": "StableDiffusionImg2ImgPipeline"}
    )
    return root
