"""Which part of a Blended trigger stops a finished classifier from reading an image?

A blend x' = (1 - r) x + r p does two things: it scales the image's contrast by (1 - r)
towards the pattern's mean level, and it adds the pattern's zero-mean part r (p - mean p). This
probe applies each part alone and the whole blend to clean test images, and prints each
classifier's accuracy and target rate on the non-target images under each:

  python scripts/probe_blend_parts.py --config configs/fashion_mnist_blended.py \\
      --workdir runs/blended --stages learnability/clean_originals,learnability/variations \\
      [--recipe learnability] [--num_images 2000]

`--recipe` names the config field the stages were trained with (`learnability` reads
`config.diagnostics.learnability`; otherwise `config.<recipe>`, e.g. teacher).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
from probe_contrast import load_config  # noqa: E402

from jaxclean import attacks, evaluate, experiment, train  # noqa: E402


def blend_parts(images: np.ndarray, blended: np.ndarray, ratio: float) -> dict:
    """The clean images, the blend, and each of its two parts alone, as uint8."""
    x = images.astype(np.float64)
    pattern = (blended.astype(np.float64) - (1.0 - ratio) * x) / ratio
    parts = {
        "original": x,
        "blend": blended.astype(np.float64),
        "contrast_and_level_only": (1.0 - ratio) * x + ratio * pattern.mean(),
        "pattern_noise_only": x + ratio * (pattern - pattern.mean()),
    }
    return {k: np.clip(np.round(v), 0, 255).astype(np.uint8) for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--stages", required=True, help="comma-separated finished classifiers")
    parser.add_argument("--recipe", default="learnability")
    parser.add_argument("--num_images", type=int, default=2000)
    args = parser.parse_args()

    config = load_config(args.config)
    if config.attack.name != "blended":
        raise SystemExit(f"{args.config} has attack {config.attack.name!r}, not blended")
    recipe = (
        config.diagnostics.learnability if args.recipe == "learnability" else config[args.recipe]
    )
    exp = experiment.Experiment(config, args.workdir)
    test = exp.splits.test
    count = min(args.num_images, len(test))
    rows = np.arange(count)
    blended = attacks.make_trigger(config.attack).apply(test.images[rows], rows, stream="test")
    parts = blend_parts(test.images[rows], blended, config.attack.trigger.ratio)
    labels = test.labels[rows]
    non_target = labels != config.attack.target
    for stage in args.stages.split(","):
        model, variables = experiment.load_classifier(exp, stage, recipe, test.num_classes)
        predict_fn = train.make_predict_fn(model.apply, exp.mesh)
        result = {}
        for name, images in parts.items():
            predicted = evaluate.predictions(
                predict_fn, variables, images, recipe.eval_batch_size, exp.mesh
            )
            result[name] = {
                "accuracy": round(evaluate.accuracy(predicted, labels), 4),
                "target_rate_non_target": round(
                    float(np.mean(predicted[non_target] == config.attack.target)), 4
                ),
            }
        print(json.dumps({"stage": stage, "num_images": int(count), **result}))


if __name__ == "__main__":
    main()
