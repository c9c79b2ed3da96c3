"""Trigger detectability, as a stage: the detector of `jaxclean.detectability` on the run's
variations, and on the sources as its positive control.

Each poisoned row's variation is paired with its clean twin: a variation of the row's clean
source drawn with the row's own noise and label, so the two differ only through the trigger.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxclean import detectability, train
from jaxclean.checks import ConfigError
from jaxclean.data import ImageDataset
from jaxclean.experiment import Experiment, log
from jaxclean.models import classifier_from_recipe
from jaxclean.stages import regenerate
from jaxclean.stages.classifier_stage import fit_classifier


def clean_twin_variations(exp: Experiment) -> np.ndarray:
    """Variations of the poisoned rows' clean sources, cached beside the variations.

    Each is sampled with its row's index and poisoned label under the regenerate stage's key,
    so it has the noise and conditioning label of the row's variation and differs from it only
    through the source's pixels: the trigger.
    """
    indices = exp.plan.indices
    cached = regenerate.cached_variations(
        exp,
        "clean_twins.npz",
        lambda cached: np.array_equal(cached["indices"], indices),
        lambda vary: {
            "indices": indices,
            "images": vary(
                exp.splits.train.images[indices],
                indices,
                exp.poisoned_train.labels[indices],
                jax.random.key(exp.config.regenerate.seed),
            ),
        },
    )
    return cached["images"]


def detector_split(exp: Experiment) -> tuple[np.ndarray, np.ndarray]:
    """The detector's (training, held-out) pairs, or a clear error before any work is done."""
    config = exp.config.diagnostics
    num_pairs = len(exp.plan.indices)
    try:
        fit_rows, held_rows = detectability.split_pairs(
            num_pairs, config.detectability_held_out, exp.config.seed
        )
    except ValueError as e:
        raise ConfigError(f"trigger detectability on {num_pairs} poisoned rows: {e}") from e
    if 2 * len(fit_rows) < config.detectability.batch_size:
        raise ConfigError(
            f"diagnostics.detectability.batch_size {config.detectability.batch_size} is larger "
            f"than the {2 * len(fit_rows)} images of the detector's {len(fit_rows)} training pairs"
        )
    return fit_rows, held_rows


def trigger_detectability(
    exp: Experiment, variations: ImageDataset, split: tuple[np.ndarray, np.ndarray]
) -> dict:
    """Paired accuracy of a detector of the trigger's traces, on the variations (each poisoned
    row's variation against its clean twin's) and on the sources (each poisoned image against
    its clean original: the control that the detector can see this trigger at all)."""
    config = exp.config.diagnostics
    name = exp.config.regenerate.name
    indices = exp.plan.indices
    fit_rows, held_rows = split
    base = {
        **exp.poison_spec(),
        "recipe": config.detectability,
        "held_out": config.detectability_held_out,
    }

    def variation_pairs():
        return variations.images[indices], clean_twin_variations(exp)

    def source_pairs():
        return exp.poisoned_train.images[indices], exp.splits.train.images[indices]

    pairs = (
        (
            "variations",
            f"detectability/{name}",
            variation_pairs,
            {**base, "variations": regenerate.finished(exp).spec_fingerprint},
        ),
        ("sources", "detectability/sources", source_pairs, base),
    )
    summary = {
        "trigger_detectability/held_out_pairs": int(len(held_rows)),
        "trigger_detectability/chance_standard_error": detectability.chance_standard_error(
            len(held_rows)
        ),
    }
    for label, stage, make_pairs, spec in pairs:
        metrics = fit_detector(exp, stage, spec, make_pairs, fit_rows, held_rows)
        summary[f"trigger_detectability/paired_accuracy_{label}"] = metrics["paired_accuracy"]
    return summary


def fit_detector(exp: Experiment, stage: str, spec: dict, make_pairs, fit_rows, held_rows):
    """Trains one detector on the fit pairs as a resumable stage; its held-out paired accuracy."""
    record = exp.record(stage, spec)
    if record.is_done():
        return record.done_record()["metrics"]
    record.claim()
    recipe = exp.config.diagnostics.detectability
    triggered, clean = make_pairs()
    model = classifier_from_recipe(recipe, len(detectability.PAIR_CLASSES))
    predict_fn = train.make_predict_fn(model.apply, exp.mesh)
    dataset = detectability.pair_dataset(triggered[fit_rows], clean[fit_rows])
    variables, timing, _ = fit_classifier(
        exp, record, stage, model, predict_fn, dataset, recipe, None, (), exp.config.seed
    )

    def scores(images_):
        return detectability.detector_scores(
            predict_fn, variables, images_, recipe.eval_batch_size, exp.mesh
        )

    metrics = {
        "paired_accuracy": detectability.paired_accuracy(
            scores(triggered[held_rows]), scores(clean[held_rows])
        ),
        **timing,
    }
    if exp.is_writer:
        record.mark_done({"metrics": metrics})
    log(f"{stage}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return metrics
