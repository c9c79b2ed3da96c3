"""Runs the regeneration driver on a tiny random-weight generator, as one process of a run.

Tests start it as a subprocess to choose the number of devices (XLA_FLAGS) and processes.
Random weights make meaningless but deterministic images, which is all determinism needs; the
colour transfer gives them each source's statistics, so they are not constant.
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--per_device_batch", type=int, default=4)
    parser.add_argument("--num_images", type=int, default=60)
    parser.add_argument("--shard_size", type=int, default=16)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--coordinator")
    # A hub-layout directory: regenerate with a Stable Diffusion generator instead
    # (tests/tiny_hub.py): sd_image_variations, or sd_img2img (SDEdit at strength 0.5).
    parser.add_argument("--sd_model")
    parser.add_argument("--sd_generator", default="sd_image_variations")
    args = parser.parse_args()

    from jaxclean import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax
    import numpy as np
    from conftest import synthetic_images

    from configs import smoke
    from jaxclean import sharding, variations
    from jaxclean.data import ImageDataset
    from jaxclean.diffusion import generator, sampler, trainer

    if args.sd_model:
        from tiny_hub import TINY_RESOLUTION

        from jaxclean.diffusion import stable_diffusion

        if args.sd_generator == "sd_img2img":
            model, params = stable_diffusion.load_sd_img2img(
                args.sd_model, (28, 28, 1), TINY_RESOLUTION, "0123456789", "digit {}"
            )
        else:
            model, params = stable_diffusion.load_sd_image_variations(
                args.sd_model, (28, 28, 1), TINY_RESOLUTION
            )
    else:
        model = generator.build(smoke.get_config().generator, (28, 28, 1), 10)
        params = trainer.random_params(model, jax.random.key(0))
    strength = 0.5 if args.sd_generator == "sd_img2img" else 1.0
    images, labels = synthetic_images(args.num_images, seed=3)
    dataset = ImageDataset(images[..., None], labels.astype(np.int32), tuple("0123456789"))
    mesh = sharding.local_mesh()
    params = jax.device_put(params, sharding.replicated(mesh))
    settings = sampler.SamplerSettings(steps=4, eta=0.5, guidance=2.0, strength=strength)
    sample = sampler.make_sampler(model, settings, mesh)
    stats = variations.regenerate(
        dataset,
        sample,
        params,
        args.out,
        shard_size=args.shard_size,
        per_device_batch=args.per_device_batch,
        seed=0,
        mesh=mesh,
    )
    print(f"devices={jax.device_count()} local={mesh.size} {stats}", flush=True)


if __name__ == "__main__":
    main()
