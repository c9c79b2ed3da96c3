"""Records what the bit-identity test compares against: a smoke run's metrics and a fixed batch
of the shipped generator's variations.

  python tests/reference/record.py            # writes tests/reference/*.json, *.npz

Rerun it only when a change is meant to move the figures, and say so in the commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
REPO = os.path.dirname(TESTS)
sys.path.insert(0, REPO)
sys.path.insert(0, TESTS)

SMOKE_METRICS = os.path.join(HERE, "smoke_metrics.json")
SHIPPED_VARIATIONS = os.path.join(HERE, "shipped_variations.npz")
# What a stage measured, not how long it took or where it ran.
_TIMING_KEYS = ("wall_seconds", "train_images_per_second", "sampler_images_per_second")


def figures(results: dict) -> dict:
    """results.json's models and diagnostics, less every timing."""

    def keep(name):
        return not any(name.endswith(key) for key in _TIMING_KEYS)

    out = {}
    for section in ("models", "diagnostics"):
        for name, value in results.get(section, {}).items():
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if keep(k)}
            elif not keep(name):
                continue
            out[f"{section}/{name}"] = value
    return out


def smoke_figures(workdir: str, data_dir: str) -> dict:
    """Every stage of the smoke config, through launch.py on one CPU device; its figures."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"
    )
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "launch.py"),
            "--config",
            os.path.join(REPO, "configs", "smoke.py"),
            "--workdir",
            workdir,
            f"--config.data.dir={data_dir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    with open(os.path.join(workdir, "report", "results.json")) as f:
        return figures(json.load(f))


def shipped_variations():
    """Variations of 16 synthetic images by the shipped generator, with the Fashion-MNIST
    configs' sampler settings and post-processing, on one device."""
    import jax
    import numpy as np
    from conftest import synthetic_images

    from configs import fashion_mnist_badnets
    from jaxclean import checkpointing, sharding
    from jaxclean.diffusion import registry, sampler
    from jaxclean.diffusion.postprocess import Postprocess
    from jaxclean.stages.generator import EXPORT_FILE

    config = fashion_mnist_badnets.get_config()
    images, labels = synthetic_images(16, seed=3)
    model = registry.get(config.generator.name).build(config.generator, (28, 28, 1), 10)
    with open(os.path.join(config.generator.pretrained, EXPORT_FILE), "rb") as f:
        params = checkpointing.from_safetensors(f.read())
    settings = sampler.SamplerSettings.from_config(config.regenerate)
    mesh = sharding.make_mesh(jax.local_devices()[:1])
    sample = sampler.make_sampler(model, settings, mesh)
    indices = np.arange(len(images), dtype=np.int32)
    out = sample(params, images[..., None], indices, labels.astype(np.int32), jax.random.key(0))
    return Postprocess.from_config(config.regenerate.postprocess)(np.asarray(out))


def main():
    import numpy as np
    from conftest import write_idx_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_idx_dataset(os.path.join(tmp, "idx"))
        with open(SMOKE_METRICS, "w") as f:
            json.dump(
                smoke_figures(os.path.join(tmp, "run"), data_dir), f, indent=1, sort_keys=True
            )
    np.savez_compressed(SHIPPED_VARIATIONS, images=shipped_variations())
    print(f"wrote {SMOKE_METRICS} and {SHIPPED_VARIATIONS}")


if __name__ == "__main__":
    main()
