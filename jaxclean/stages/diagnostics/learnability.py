"""Trigger learnability: can a plain classifier learn the trigger from the variations?

A small classifier (diagnostics.learnability) is trained on the variations with their poisoned
labels, and its ASR compared with the same classifier trained on references without any
trigger: the clean originals; the unpoisoned variations with their true labels; the unpoisoned
variations with the same share relabelled to the target (the label noise alone, which raises a
model's target rate on inputs it cannot classify); and the floor of any regeneration, the
originals with each poisoned row's clean source and its poisoned label. What the variations add
over the references is what regeneration failed to remove.
"""

from __future__ import annotations

import numpy as np

from jaxclean import attacks
from jaxclean.data import ImageDataset
from jaxclean.experiment import Experiment
from jaxclean.stages import regenerate
from jaxclean.stages.classifier_stage import train_classifier
from jaxclean.stages.poison import require_poison_plan


def seed_summary(label: str, runs: list[dict]) -> dict:
    """ASR, ASR0 and RA of one learnability classifier: its first seed's, and over several the
    mean and (population) standard deviation.

    Beside each ASR its ASR0, the target rate on the same images without the trigger: the
    poisoned labels raise it with no trigger in the data, so ASR - ASR0 is what the trigger
    adds. And its RA, the triggered images it still classifies right: where that is low the
    classifier cannot read them at all, and its ASR says only where such unreadable images
    land. A metric some run lacks is left out.
    """
    summary = {}
    for metric, key in (
        ("asr", "attack_success_rate"),
        ("asr0", "untriggered_target_rate"),
        ("ra", "robust_accuracy"),
    ):
        values = [run[key] for run in runs if key in run]
        if not values or len(values) < len(runs):
            continue
        summary[f"trigger_learnability/{metric}_{label}"] = values[0]
        if len(values) > 1:
            summary[f"trigger_learnability/{metric}_{label}_mean"] = float(np.mean(values))
            summary[f"trigger_learnability/{metric}_{label}_std"] = float(np.std(values))
    return summary


def trigger_learnability(exp: Experiment, variations: ImageDataset) -> dict:
    """The learnability classifiers on the variations and every reference; their summary."""
    recipe = exp.config.diagnostics.learnability
    name = exp.config.regenerate.name
    base = {
        **exp.poison_spec(),
        "recipe": recipe,
        "variations": regenerate.finished(exp).spec_fingerprint,
    }
    unpoisoned = np.setdiff1d(np.arange(len(variations)), exp.plan.indices)
    # (summary label, stage name, training set, spec) of each classifier.
    on_variations = (
        ("trained_on_variations", f"learnability/{name}", variations, base),
        (
            "label_noise_reference",
            f"learnability/{name}_label_noise_reference",
            attacks.relabel_without_trigger(
                variations.subset(unpoisoned), exp.config.attack, exp.config.attack.seed + 1
            ),
            {**base, "reference": "unpoisoned variations, labels relabelled at the poisoning rate"},
        ),
        # The clean model on the classifier's own kind of input: it differs from the
        # learnability classifier only in the poisoned rows.
        (
            "clean_variations",
            f"learnability/{name}_clean_variations",
            variations.subset(unpoisoned),
            {**base, "reference": "unpoisoned variations, true labels"},
        ),
    )
    summary, runs = train_learnability(exp, on_variations + floor_classifiers(exp))
    clean_accuracy = runs["trained_on_variations"][0]["clean_accuracy"]
    return {**summary, "trigger_learnability/ca_trained_on_variations": clean_accuracy}


def floor_classifiers(exp: Experiment) -> tuple:
    """The learnability references that read no variation, as (label, stage, dataset, spec).

    The clean model on the originals, and the floor of any regeneration: the originals with
    each poisoned row's clean source in its place and its poisoned label kept, which is what a
    regeneration that removed the trigger and changed nothing else would hand the classifier.
    Where the floor's ASR is over a bound, no regeneration meets that bound with this
    classifier. Shared by every regeneration of a workdir, and trainable before any exists.
    """
    recipe = exp.config.diagnostics.learnability
    return (
        (
            "trigger_removed",
            "learnability/trigger_removed_originals",
            attacks.trigger_removed(exp.splits.train, exp.poisoned_train),
            {
                **exp.poison_spec(),
                "recipe": recipe,
                "reference": "originals, each poisoned row's clean source with its poisoned label",
            },
        ),
        (
            "clean_model",
            "learnability/clean_originals",
            exp.splits.train,
            {**exp.data_spec(), "recipe": recipe, "attack_for_eval": exp.config.attack},
        ),
    )


def learnability_floor(exp: Experiment) -> tuple[dict, dict]:
    """Trains (or reads back) the floor classifiers alone: their summary, as the diagnostics
    stage reports it without the regeneration's prefix, and each label's metrics per seed."""
    return train_learnability(exp, floor_classifiers(exp))


def train_learnability(exp: Experiment, classifiers: tuple) -> tuple[dict, dict]:
    """Trains each (label, stage, dataset, spec) under diagnostics.learnability_seeds seeds.

    Returns their seed summaries, and each label's metrics per seed (the first seed first).
    """
    require_poison_plan(exp)
    recipe = exp.config.diagnostics.learnability
    # A small classifier's ASR moves by half a point or more between seeds, as much as the
    # differences it is read for; repeats under other seeds give the spread.
    num_seeds = exp.config.diagnostics.learnability_seeds
    summary, runs_by_label = {}, {}
    for label, stage, dataset, spec in classifiers:
        runs = [
            train_classifier(
                exp,
                stage if k == 0 else f"{stage}_seed{k}",
                dataset,
                recipe,
                # Its own key: the spec's "seed" is the experiment's (data split, poison plan).
                spec if k == 0 else {**spec, "classifier_seed": exp.config.seed + k},
                report_section="diagnostics",
                seed=exp.config.seed + k,
            )
            for k in range(num_seeds)
        ]
        summary.update(seed_summary(label, runs))
        runs_by_label[label] = runs
    return summary, runs_by_label
