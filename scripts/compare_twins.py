"""What differs between each poisoned row's variation and its clean twin?

The diagnostics stage's detector (`jaxclean.detectability`) says whether the two can be told
apart; this says in what. For the variations and, beside them, for the sources (poisoned image
against clean original), it prints the mean per-pair differences of image mean, standard
deviation and share of near-black pixels, the paired accuracy that each of those statistics
alone would reach as a detector, the mean absolute pixel difference, the mean difference on the
clean original's black background and on the rest, and, for a Blended
trigger, the correlation of the average difference image with the blend pattern (a pixel trace
of the pattern shows up there; a change the generator renders from the embedding does not).

  python scripts/compare_twins.py --config configs/fashion_mnist_blended.py \\
      --workdir runs/blended [--config.regenerate.name=sdedit_0.3 ...]

Run after the diagnostics stage, which caches the twins beside the variations.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxclean import attacks, detectability, experiment, generation  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "the run's workdir")
flags.mark_flags_as_required(["config", "workdir"])


def pair_statistics(triggered: np.ndarray, clean: np.ndarray) -> dict:
    """Per-pair differences of global statistics, and each statistic's paired accuracy."""
    triggered, clean = triggered.astype(np.float64), clean.astype(np.float64)

    def stats(images):
        axes = tuple(range(1, images.ndim))
        return images.mean(axes), images.std(axes), (images < 10).mean(axes)

    (mean_t, std_t, black_t), (mean_c, std_c, black_c) = stats(triggered), stats(clean)
    return {
        "mean_difference": float(np.mean(mean_t - mean_c)),
        "std_difference": float(np.mean(std_t - std_c)),
        "black_share_difference": float(np.mean(black_t - black_c)),
        "paired_accuracy_brighter": detectability.paired_accuracy(mean_t, mean_c),
        "paired_accuracy_lower_std": detectability.paired_accuracy(-std_t, -std_c),
        "paired_accuracy_less_black": detectability.paired_accuracy(-black_t, -black_c),
        "mean_absolute_pixel_difference": float(np.mean(np.abs(triggered - clean))),
    }


def pattern_correlation(triggered, clean, pattern) -> float:
    """Correlation of the average (triggered - clean) image with the zero-mean pattern."""
    difference = (triggered.astype(np.float64) - clean).mean(0)
    centred = pattern - pattern.mean()
    return float(np.corrcoef(difference.ravel(), centred.ravel())[0, 1])


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    exp = experiment.Experiment(config, _WORKDIR.value)
    indices = exp.plan.indices
    twins_path = os.path.join(generation.variations_dir(exp), "clean_twins.npz")
    if not os.path.exists(twins_path):
        raise SystemExit(f"no {twins_path}: run --stages=diagnostics first")
    with np.load(twins_path) as cached:
        if not np.array_equal(cached["indices"], indices):
            raise SystemExit(f"{twins_path} is of another poison plan")
        twins = cached["images"]
    pairs = {
        "variations": (generation.load_variations(exp).images[indices], twins),
        "sources": (exp.poisoned_train.images[indices], exp.splits.train.images[indices]),
    }
    pattern = None
    if config.attack.name == "blended":
        # The pattern itself: the blend of a black image, divided by the ratio.
        black = np.zeros((1, *exp.splits.train.image_shape), np.uint8)
        blend = attacks.make_trigger(config.attack).apply(black, np.arange(1), stream="test")
        pattern = blend[0].astype(np.float64) / config.attack.trigger.ratio
    # Where the clean original is black (the background) and where it is not (the garment).
    background = exp.splits.train.images[indices] == 0
    for name, (triggered, clean) in pairs.items():
        result = pair_statistics(triggered, clean)
        difference = triggered.astype(np.float64) - clean
        result["difference_on_background"] = float(difference[background].mean())
        result["difference_on_foreground"] = float(difference[~background].mean())
        if pattern is not None:
            result["pattern_correlation"] = pattern_correlation(triggered, clean, pattern)
        print(json.dumps({"pairs": name, **{k: round(v, 4) for k, v in result.items()}}))


if __name__ == "__main__":
    app.run(main)
