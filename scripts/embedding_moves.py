"""How far does a trigger move the generator's embedding of a source?

The variations carry a trigger only through the encoder's embedding of the source. This script
embeds each poisoned row twice, triggered and clean, with the encoder of one or more generator
checkpoints, and reports (standardised units, as the UNet reads them):

  move                 mean norm of the difference (what the generator can render)
  mean_shift           norm of the mean difference (the part common to every row)
  nearest_trusted      mean distance from a clean source to its nearest trusted image
  same_nearest         share of rows whose nearest trusted image is the same both ways
  move_<part>          for Blended, the move under the blend's contrast-and-level part alone
                       and under its pattern noise alone (scripts/probe_blend_parts.py)

  python scripts/embedding_moves.py --config configs/fashion_mnist_blended.py \\
      --workdir runs/blended --generators runs/blended/generator/model,runs/other/generator/model
"""

from __future__ import annotations

import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from probe_blend_parts import blend_parts  # noqa: E402
from probe_contrast import load_config  # noqa: E402

from jaxclean import experiment, generation  # noqa: E402


def embedding_moves(
    clean: np.ndarray, triggered: np.ndarray, trusted: np.ndarray
) -> dict[str, float]:
    """The figures above from embeddings [N, D] of clean and triggered sources, trusted [M, D]."""
    difference = triggered - clean

    def nearest(queries):
        distances = (
            (queries**2).sum(1)[:, None] - 2.0 * queries @ trusted.T + (trusted**2).sum(1)[None]
        )
        return distances.argmin(1), np.sqrt(np.maximum(distances.min(1), 0.0))

    clean_nearest, clean_distance = nearest(clean)
    triggered_nearest, _ = nearest(triggered)
    return {
        "move": float(np.linalg.norm(difference, axis=1).mean()),
        "mean_shift": float(np.linalg.norm(difference.mean(0))),
        "nearest_trusted": float(clean_distance.mean()),
        "same_nearest": float(np.mean(clean_nearest == triggered_nearest)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True, help="a workdir with a poison plan")
    parser.add_argument("--generators", required=True, help="comma-separated checkpoints")
    args = parser.parse_args()
    config = load_config(args.config)
    exp = experiment.Experiment(config, args.workdir)
    model = generation.build_generator(exp)
    rows = exp.plan.indices
    clean, triggered = exp.splits.train.images[rows], exp.poisoned_train.images[rows]
    trusted = generation.generator_split(exp).images
    parts = {}
    if config.attack.name == "blended":
        split = blend_parts(clean, triggered, config.attack.trigger.ratio)
        parts = {k: split[k] for k in ("contrast_and_level_only", "pattern_noise_only")}
    for path in args.generators.split(","):
        params = generation.load_generator_params(model, path)
        embed = jax.jit(lambda images, params=params: model.embed(params, images))

        def embedded(images, embed=embed):
            size = config.generator.encode_batch_size
            return np.concatenate(
                [np.asarray(embed(images[i : i + size])) for i in range(0, len(images), size)]
            )

        clean_embedding = embedded(clean)
        figures = embedding_moves(clean_embedding, embedded(triggered), embedded(trusted))
        for name, images in parts.items():
            moved = embedded(images) - clean_embedding
            figures[f"move_{name}"] = float(np.linalg.norm(moved, axis=1).mean())
        print(path, " ".join(f"{k}={v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
