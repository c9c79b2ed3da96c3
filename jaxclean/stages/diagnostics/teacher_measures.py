"""The teacher on variations of test images: what regeneration keeps, adds and lets through.

content_kept          the teacher's accuracy on variations of clean test images
artefact_activation   how often it calls a variation of a clean non-target image the target
                      (a generator artefact that reads as the trigger)
trigger_survival      the target rate on variations of triggered test images, less that on
                      variations of the same images without the trigger
"""

from __future__ import annotations

import jax
import numpy as np

from jaxclean import attacks, evaluate, train
from jaxclean.experiment import Experiment
from jaxclean.stages import regenerate


def test_variation_sets(exp: Experiment) -> dict:
    """Variations of a test subset, clean and triggered, cached beside the variations."""
    test = exp.splits.test
    subset = np.arange(min(exp.config.diagnostics.test_size, len(test)))
    clean = test.subset(subset)
    non_target = subset[clean.labels != exp.config.attack.target]
    trigger = attacks.make_trigger(exp.config.attack)
    triggered_images = trigger.apply(test.images[non_target], non_target, stream="test")
    # Test images get their own key so no variation shares noise with a training image.
    key = jax.random.fold_in(jax.random.key(exp.config.regenerate.seed), 1)
    cached = regenerate.cached_variations(
        exp,
        "test_variations.npz",
        lambda cached: len(cached["clean"]) == len(subset),
        lambda vary: {
            "clean": vary(clean.images, subset, clean.labels, key),
            # The same index as its clean twin: the same noise, so only the trigger differs.
            "triggered": vary(triggered_images, non_target, test.labels[non_target], key),
        },
    )
    return {
        "subset": subset,
        "non_target": non_target,
        "clean_variations": cached["clean"],
        "triggered_variations": cached["triggered"],
        "triggered_images": triggered_images,
    }


def measure(exp: Experiment, teacher_model, teacher_vars) -> dict:
    """The teacher's content, artefact and survival figures."""
    sets = test_variation_sets(exp)
    test, target = exp.splits.test, exp.config.attack.target
    predict_fn = train.make_predict_fn(teacher_model.apply, exp.mesh)
    batch = exp.config.teacher.eval_batch_size

    def predicted(images_):
        return evaluate.predictions(predict_fn, teacher_vars, images_, batch, exp.mesh)

    subset = sets["subset"]
    labels = test.labels[subset]
    original = predicted(test.images[subset])
    varied = predicted(sets["clean_variations"])
    is_non_target = labels != target
    varied_triggered = predicted(sets["triggered_variations"])

    def target_rate(predictions):
        return float(np.mean(predictions == target))

    return {
        "content_kept/teacher_accuracy_on_variations": float(np.mean(varied == labels)),
        "content_kept/teacher_accuracy_on_originals": float(np.mean(original == labels)),
        "artefact_activation/target_rate_on_variations": target_rate(varied[is_non_target]),
        "artefact_activation/target_rate_on_originals": target_rate(original[is_non_target]),
        "trigger_survival/target_rate_triggered_variations": target_rate(varied_triggered),
        "trigger_survival/target_rate_clean_variations": target_rate(varied[is_non_target]),
        "trigger_survival/difference": target_rate(varied_triggered)
        - target_rate(varied[is_non_target]),
        "test_subset_size": int(len(subset)),
        "triggered_subset_size": int(len(sets["non_target"])),
    }
