"""Sampler throughput: jaxclean's one-jit DDIM loop against diffusers' PyTorch loop, one run.

Both run the same UNet config (the Fashion-MNIST generator's latent UNet) through the same
guided DDIM loop (20 steps, guidance > 1: two UNet passes a step, batched together) on one
machine, and the script prints images/s of each and their ratio. Then it times jaxclean's whole
variation sampler (encoder + DDIM + VAE decode) on 1, 2 and 4 forced CPU devices.

  python benchmarks/sampler_throughput.py [--batch 128 --steps 20]
  python benchmarks/sampler_throughput.py --torch_device cuda --batch 1024 --skip_devices  # GPU

JAX runs on its default backend; --torch_device puts PyTorch on the same kind of device.

Needs the [bench] extra (torch). Results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)


def generator_config():
    from configs import common

    return common.generator_config()


def jax_loop(batch: int, steps: int, guidance: float) -> float:
    import jax
    import jax.numpy as jnp

    from jaxclean.diffusion import adapter, generator, sampler, trainer

    model = generator.build(generator_config(), (28, 28, 1), 10)
    params = trainer.random_params(model, jax.random.key(0))
    alphas = jnp.asarray(model.alphas_cumprod)
    timesteps, previous = sampler.ddim_timesteps(len(model.alphas_cumprod), steps, 1.0)

    from jax.sharding import PartitionSpec as P

    from jaxclean import sharding

    mesh = sharding.make_mesh()

    def per_device(unet_params, latents, context):
        rows = latents.shape[0]

        def body(i, latents):
            t, prev = jnp.asarray(timesteps)[i], jnp.asarray(previous)[i]
            both = jnp.concatenate([latents, latents])
            noise = adapter.predict_noise(
                model.unet, unet_params, both, jnp.full((2 * rows,), t), context
            )
            uncond, cond = jnp.split(noise, 2)
            noise = uncond + guidance * (cond - uncond)
            alpha_prev = jnp.where(prev >= 0, alphas[jnp.maximum(prev, 0)], 1.0)
            return sampler.ddim_update(latents, noise, alphas[t], alpha_prev, 0.0, 0.0)

        return jax.lax.fori_loop(0, len(timesteps), body, latents)

    # As the real sampler: each device runs the loop on its rows.
    run = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=P("data"),
            check_vma=False,
        )
    )
    latents = jax.random.normal(jax.random.key(1), (batch, *model.latent_shape))
    # Each device's rows get their own [null; conditional] context block.
    context = jnp.zeros((2 * batch, 1, model.embed_dim))
    run(params["unet"], latents, context).block_until_ready()
    start = time.perf_counter()
    repeats = 3
    for _ in range(repeats):
        out = run(params["unet"], latents, context)
    out.block_until_ready()
    return repeats * batch / (time.perf_counter() - start)


def torch_loop(batch: int, steps: int, guidance: float, device: str) -> float:
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    if device == "cpu":
        torch.set_num_threads(2)
    else:
        # TF32 matmuls, as XLA uses for float32 on such GPUs by default (cuDNN convolutions
        # already use TF32 in PyTorch by default).
        torch.set_float32_matmul_precision("high")
    config = generator_config()
    unet_config = config.unet
    levels = len(unet_config.block_out_channels)
    attention = (False,) + (True,) * (levels - 1)
    latent = config.image_size // 2 ** (len(config.vae.block_out_channels) - 1)
    unet = (
        UNet2DConditionModel(
            sample_size=latent,
            in_channels=config.vae.latent_channels,
            out_channels=config.vae.latent_channels,
            down_block_types=tuple(
                "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention
            ),
            up_block_types=tuple(
                "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)
            ),
            block_out_channels=tuple(unet_config.block_out_channels),
            layers_per_block=unet_config.layers_per_block,
            attention_head_dim=unet_config.attention_head_dim,
            cross_attention_dim=64,
        )
        .eval()
        .to(device)
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
    )
    scheduler.set_timesteps(steps)
    context = torch.zeros(2 * batch, 1, 64, device=device)
    latents0 = torch.randn(batch, config.vae.latent_channels, latent, latent, device=device)

    def synchronize():  # CUDA calls return before the work is done.
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run():
        latents = latents0.clone()
        for t in scheduler.timesteps:
            noise = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        return latents

    with torch.inference_mode():
        run()
        synchronize()
        start = time.perf_counter()
        repeats = 3
        for _ in range(repeats):
            run()
        synchronize()
    return repeats * batch / (time.perf_counter() - start)


DEVICE_SCRIPT = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {repo!r})
import jax, numpy as np
from configs import common
from jaxclean import sharding
from jaxclean.diffusion import generator, sampler, trainer
model = generator.build(common.generator_config(), (28, 28, 1), 10)
mesh = sharding.make_mesh()
params = jax.device_put(trainer.random_params(model, jax.random.key(0)), sharding.replicated(mesh))
run = sampler.make_sampler(model, sampler.SamplerSettings(steps={steps}, guidance=3.0), mesh)
batch = {per_device} * jax.device_count()
images = np.zeros((batch, 28, 28, 1), np.uint8)
idx = np.arange(batch, dtype=np.int32)
run(params, images, idx, idx % 10, jax.random.key(0)).block_until_ready()
start = time.perf_counter()
for _ in range(2):
    out = run(params, images, idx, idx % 10, jax.random.key(0))
out.block_until_ready()
seconds = time.perf_counter() - start
print(json.dumps({{"devices": jax.device_count(), "ips": 2 * batch / seconds}}))
"""


def sampler_on_devices(devices: int, per_device: int, steps: int) -> float:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    script = DEVICE_SCRIPT.format(repo=REPO, steps=steps, per_device=per_device)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["ips"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--skip_devices", action="store_true")
    parser.add_argument("--torch_device", default="cpu", help="cpu, or cuda on a GPU machine")
    args = parser.parse_args()
    jax_ips = jax_loop(args.batch, args.steps, args.guidance)
    torch_ips = torch_loop(args.batch, args.steps, args.guidance, args.torch_device)
    import jax

    print(
        f"latent UNet, {args.steps} DDIM steps with guidance, batch {args.batch}, "
        f"{jax.device_count()} JAX {jax.default_backend()} device(s), PyTorch on "
        f"{args.torch_device}"
    )
    print(f"jaxclean (one jit)  : {jax_ips:8.1f} images/s")
    print(f"diffusers PyTorch   : {torch_ips:8.1f} images/s")
    print(f"ratio JAX/PyTorch   : {jax_ips / torch_ips:8.2f}x")
    if not args.skip_devices:
        # The same total batch split over more (forced) devices of the same two cores.
        total = 64
        for devices in (1, 2, 4):
            ips = sampler_on_devices(devices, total // devices, args.steps)
            print(f"whole sampler, {devices} device(s), batch {total}: {ips:8.1f} images/s")


if __name__ == "__main__":
    main()
