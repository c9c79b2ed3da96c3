"""Stage diagnostics: the clean twins, the detector's split, and the learnability
classifiers (the floor before any generator, and repeats under other seeds)."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import smoke_config

from jaxclean import checkpointing, experiment, pipeline
from jaxclean.stages import regenerate
from jaxclean.stages.diagnostics import detectability, learnability


@pytest.mark.slow
def test_clean_twins_have_each_poisoned_rows_noise_and_label(idx_dir, run_copy):
    """A twin differs from its row's variation only by the source's pixels.

    Given the poisoned images themselves as the "clean" sources, each twin must be exactly the
    variation the regenerate stage wrote for its row: the same key, index and label.
    """
    exp = experiment.Experiment(smoke_config(idx_dir), run_copy)
    stored = regenerate.load_variations(exp).images[exp.plan.indices]
    # The diagnostics stage of the run cached the real twins beside the variations.
    cached = os.path.join(run_copy, "regenerated", "variations", "clean_twins.npz")
    with np.load(cached) as real:
        np.testing.assert_array_equal(real["indices"], exp.plan.indices)
        assert real["images"].shape == stored.shape
    os.remove(cached)
    exp.poisoned  # noqa: B018  The plan and poisoned set, from the real train split.
    exp.splits = dataclasses.replace(exp.splits, train=exp.poisoned_train)
    twins = detectability.clean_twin_variations(exp)
    np.testing.assert_array_equal(twins, stored)
    # Cached again: a second call reads them back rather than sampling.
    assert os.path.exists(cached)
    np.testing.assert_array_equal(detectability.clean_twin_variations(exp), twins)


@pytest.mark.slow
def test_detector_too_few_pairs_for_its_batch_is_refused_before_training(run_copy, idx_dir):
    config = smoke_config(idx_dir)
    config.diagnostics.detectability.batch_size = 64  # The smoke run has 11 training pairs.
    shutil.rmtree(os.path.join(run_copy, "learnability"))
    with pytest.raises(pipeline.ConfigError, match=r"batch_size 64 is larger than the 22 images"):
        pipeline.run(config, run_copy, "diagnostics")
    assert not os.path.exists(os.path.join(run_copy, "learnability"))


def test_seed_summary_keeps_the_first_seed_and_adds_mean_and_spread():
    runs = [
        {"attack_success_rate": 0.01, "untriggered_target_rate": 0.03, "robust_accuracy": 0.2},
        {"attack_success_rate": 0.04, "untriggered_target_rate": 0.03, "robust_accuracy": 0.3},
    ]
    summary = learnability.seed_summary("x", runs)
    assert summary["trigger_learnability/asr_x"] == 0.01
    assert summary["trigger_learnability/asr_x_mean"] == pytest.approx(0.025)
    assert summary["trigger_learnability/asr_x_std"] == pytest.approx(0.015)
    assert summary["trigger_learnability/asr0_x_std"] == pytest.approx(0.0)
    assert summary["trigger_learnability/ra_x"] == 0.2
    assert summary["trigger_learnability/ra_x_mean"] == pytest.approx(0.25)
    # One seed: no spread to report; a record without ASR0 (older runs): none claimed.
    single = learnability.seed_summary("x", [{"attack_success_rate": 0.02}])
    assert single == {"trigger_learnability/asr_x": 0.02}


@pytest.mark.slow
def test_learnability_floor_trains_before_any_generator_and_the_diagnostics_reuse_it(
    run_copy, idx_dir, tmp_path, capsys
):
    config = smoke_config(idx_dir)
    # A workdir with nothing in it: the floor needs only the poison plan, which it makes.
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    summary, _ = learnability.learnability_floor(experiment.Experiment(config, fresh))
    for label in ("trigger_removed", "clean_model"):
        for metric in ("asr", "asr0", "ra"):
            assert 0.0 <= summary[f"trigger_learnability/{metric}_{label}"] <= 1.0
    made = set(os.listdir(fresh))
    assert {"poison", "learnability"} <= made and not {"teacher", "generator", "regenerated"} & made
    spec = json.load(open(os.path.join(fresh, "learnability/trigger_removed_originals/spec.json")))
    assert spec["attack"]["name"] == config.attack.name and "variations" not in spec
    # In a finished run it is one of the diagnostics' own stages: trained alone, read back.
    shutil.rmtree(os.path.join(run_copy, "learnability", "trigger_removed_originals"))
    learnability.learnability_floor(experiment.Experiment(config, run_copy))
    assert "learnability/trigger_removed_originals: training" in capsys.readouterr().out
    pipeline.run(config, run_copy, "diagnostics")
    out = capsys.readouterr().out
    assert "learnability/trigger_removed_originals: done already" in out
    results = json.load(open(os.path.join(run_copy, "report", "results.json")))["diagnostics"]
    stage = results["learnability/trigger_removed_originals"]
    assert (
        results["variations/trigger_learnability/asr_trigger_removed"]
        == stage["attack_success_rate"]
    )


@pytest.mark.slow
def test_learnability_repeats_under_other_seeds_keep_the_first(run_copy, idx_dir, capsys):
    config = smoke_config(idx_dir)
    config.diagnostics.learnability_seeds = 2
    pipeline.run(config, run_copy, "diagnostics")
    out = capsys.readouterr().out
    # The first seed's classifiers are the finished ones; only the repeats train.
    assert "learnability/variations: done already" in out
    assert "learnability/clean_originals: done already" in out
    assert "learnability/variations_seed1: training" in out
    results = json.load(open(os.path.join(run_copy, "report", "results.json")))["diagnostics"]
    for label in (
        "trained_on_variations",
        "label_noise_reference",
        "clean_variations",
        "trigger_removed",
    ):
        for suffix in ("", "_mean", "_std"):
            assert f"variations/trigger_learnability/asr_{label}{suffix}" in results
    assert "learnability/variations_seed1" in results
    # The repeat names its own seed beside the experiment's, which it keeps.
    spec = json.load(open(os.path.join(run_copy, "learnability/variations_seed1/spec.json")))
    assert (spec["seed"], spec["classifier_seed"]) == (0, 1)
    # Another seed is another model, not a copy of the first.
    first_params = checkpointing.load_tree(os.path.join(run_copy, "learnability/variations/model"))
    second_params = checkpointing.load_tree(
        os.path.join(run_copy, "learnability/variations_seed1/model")
    )
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(first_params), jax.tree.leaves(second_params))
    )
