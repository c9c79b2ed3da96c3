"""SD image variations: jaxclean's Flax sampler against diffusers' PyTorch pipeline, one run.

Both load the same hub-layout directory of random weights (written here: nothing is
downloaded) and make variations of the same images with the same settings (DDIM, guidance with
the zero image embedding, no colour transfer): jaxclean's whole sampler (CLIP, the DDIM loop and
the VAE decode in one jit, sharded over every local device) and diffusers'
StableDiffusionImageVariationPipeline under torch.inference_mode. Prints images/s of each and
the ratio.

  python benchmarks/sd_pipeline_throughput.py --size tiny            # CPU, minutes
  python benchmarks/sd_pipeline_throughput.py --size sd --dtype bfloat16   # GPU

--size tiny keeps SD 1.x's topology (four UNet levels, two layers each, attention on the first
three; four VAE levels, so latents are 1/8 of the image; a CLIP ViT with projection) at small
widths and 64 px; --size sd is SD 1.x itself (UNet 320-1280, ViT-L/14, 512 px). Needs the
[bench] extra (torch). Results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # tiny_hub: writes hub-layout weights.

SD_UNET_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2,
    in_channels=4,
    out_channels=4,
)
SIZES = {
    "tiny": dict(
        unet=dict(SD_UNET_BLOCKS, block_out_channels=[32, 64, 64, 64], attention_head_dim=8),
        vae=dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1),
        clip=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=32,
            projection_dim=64,
        ),
        resolution=64,
    ),
    "sd": dict(
        unet=dict(SD_UNET_BLOCKS, block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8),
        vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2),
        clip=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=768,
        ),
        resolution=512,
    ),
}


def write_model(root: str, size: str) -> str:
    from tiny_hub import write_sd_image_variations

    spec = SIZES[size]
    levels = len(spec["vae"]["block_out_channels"])
    vae = dict(
        spec["vae"],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=4,
        sample_size=spec["resolution"],
        scaling_factor=0.18215,
    )
    latent = spec["resolution"] // 2 ** (levels - 1)
    unet = dict(spec["unet"], sample_size=latent)
    return write_sd_image_variations(root, unet, vae, spec["clip"], spec["resolution"])


def source_images(count: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, (count, 8, 8, 3))
    return np.repeat(np.repeat(coarse, size // 8, 1), size // 8, 2).astype(np.uint8)


def time_calls(run, repeats: int) -> float:
    run()  # Compilation (JAX) or allocator warm-up (PyTorch).
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def jax_images_per_second(root, images, steps, guidance, dtype, repeats) -> tuple[float, str]:
    import jax

    from jaxclean import sharding
    from jaxclean.diffusion import sampler
    from jaxclean.diffusion import stable_diffusion as sd

    size = images.shape[1]
    model, params = sd.load_sd_image_variations(root, images.shape[1:], size, dtype)
    mesh = sharding.local_mesh()
    params = jax.device_put(params, sharding.replicated(mesh))
    settings = sampler.SamplerSettings(steps=steps, guidance=guidance, color_transfer=False)
    sample = sampler.make_sampler(model, settings, mesh)
    indices = np.arange(len(images), dtype=np.int32)
    labels = np.zeros(len(images), np.int32)
    key = jax.random.key(0)
    seconds = time_calls(lambda: np.asarray(sample(params, images, indices, labels, key)), repeats)
    return len(images) / seconds, f"{mesh.size} x {jax.devices()[0].device_kind}"


def torch_images_per_second(root, images, steps, guidance, dtype, repeats) -> tuple[float, str]:
    import diffusers
    import torch
    import transformers
    from PIL import Image

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.float16}[dtype]
    if device == "cpu":
        torch_dtype = torch.float32  # PyTorch's CPU kernels are fastest in float32.
    models = {
        "vae": diffusers.AutoencoderKL,
        "image_encoder": transformers.CLIPVisionModelWithProjection,
        "unet": diffusers.UNet2DConditionModel,
    }
    loaded = {
        name: cls.from_pretrained(root, subfolder=name, torch_dtype=torch_dtype)
        for name, cls in models.items()
    }
    pipe = diffusers.StableDiffusionImageVariationPipeline(
        **loaded,
        scheduler=diffusers.DDIMScheduler.from_pretrained(root, subfolder="scheduler"),
        feature_extractor=transformers.CLIPImageProcessor.from_pretrained(
            root, subfolder="feature_extractor"
        ),
        safety_checker=None,
        requires_safety_checker=False,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    pil = [Image.fromarray(image) for image in images]
    size = images.shape[1]

    def run():
        with torch.inference_mode():
            pipe(
                image=pil,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance,
                output_type="np",
            )
        if device == "cuda":
            torch.cuda.synchronize()

    label = f"{device} ({torch.get_num_threads()} threads)" if device == "cpu" else device
    return len(images) / time_calls(run, repeats), f"{label}, {torch_dtype}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model_dir", help="reuse weights written by an earlier run")
    args = parser.parse_args()

    root = args.model_dir or os.path.join(tempfile.mkdtemp(), f"sd-{args.size}")
    if not os.path.exists(os.path.join(root, "model_index.json")):
        start = time.perf_counter()
        write_model(root, args.size)
        print(f"wrote random {args.size} weights to {root} in {time.perf_counter() - start:.0f} s")
    images = source_images(args.batch, SIZES[args.size]["resolution"])
    common = (root, images, args.steps, args.guidance, args.dtype, args.repeats)
    ours, our_device = jax_images_per_second(*common)
    theirs, their_device = torch_images_per_second(*common)
    result = dict(
        size=args.size,
        batch=args.batch,
        steps=args.steps,
        dtype=args.dtype,
        jaxclean_images_per_s=round(ours, 3),
        jaxclean_devices=our_device,
        pytorch_images_per_s=round(theirs, 3),
        pytorch_device=their_device,
        ratio=round(ours / theirs, 3),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
