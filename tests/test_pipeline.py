"""The pipeline as users run it: launch.py end to end, resume after kill -9, and bad input."""

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from conftest import REPO, run_launch, smoke_args

from configs import common, smoke
from jaxclean import (
    attacks,
    checkpointing,
    data,
    defense,
    experiment,
    generation,
    pipeline,
    train,
)
from jaxclean.artifacts import StageConflict, without_unset


def smoke_config(data_dir, **teacher):
    config = smoke.get_config()
    config.data.dir = data_dir
    config.teacher.update(teacher)
    return config


@pytest.fixture(scope="module")
def full_run(idx_dir, tmp_path_factory):
    """Every stage of the smoke config, once, through launch.py; tests copy what they change."""
    workdir = str(tmp_path_factory.mktemp("full") / "run")
    result = run_launch(smoke_args(workdir, idx_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


@pytest.fixture
def run_copy(full_run, tmp_path) -> str:
    """A private copy of the full run's workdir, for a test that changes what is in it."""
    copy = str(tmp_path / "copy")
    shutil.copytree(full_run[0], copy)
    return copy


@pytest.mark.slow
def test_clean_twins_have_each_poisoned_rows_noise_and_label(idx_dir, run_copy):
    """A twin differs from its row's variation only by the source's pixels.

    Given the poisoned images themselves as the "clean" sources, each twin must be exactly the
    variation the regenerate stage wrote for its row: the same key, index and label.
    """
    exp = experiment.Experiment(smoke_config(idx_dir), run_copy)
    stored = generation.load_variations(exp).images[exp.plan.indices]
    # The diagnostics stage of the run cached the real twins beside the variations.
    cached = os.path.join(run_copy, "regenerated", "variations", "clean_twins.npz")
    with np.load(cached) as real:
        np.testing.assert_array_equal(real["indices"], exp.plan.indices)
        assert real["images"].shape == stored.shape
    os.remove(cached)
    exp.poisoned  # noqa: B018  The plan and poisoned set, from the real train split.
    exp.splits = dataclasses.replace(exp.splits, train=exp.poisoned_train)
    twins = generation._clean_twin_variations(exp)
    np.testing.assert_array_equal(twins, stored)
    # Cached again: a second call reads them back rather than sampling.
    assert os.path.exists(cached)
    np.testing.assert_array_equal(generation._clean_twin_variations(exp), twins)


@pytest.mark.slow
def test_launch_runs_every_stage_and_reports(full_run):
    workdir, result = full_run
    results = json.load(open(os.path.join(workdir, "report", "results.json")))
    expected_models = {
        "teacher",
        "student",
        "variations_only",
        "kd_on_original",
        "trusted_only",
        "clean_reference",
        "encoder",
    }
    assert expected_models <= set(results["models"])
    for name in expected_models:
        for key in (
            "clean_accuracy",
            "attack_success_rate",
            "robust_accuracy",
            "untriggered_target_rate",
        ):
            assert 0.0 <= results["models"][name][key] <= 1.0
    assert 0.0 <= results["models"]["student"]["defense_effectiveness_rate"] <= 1.0
    assert results["experiment"]["num_poisoned"] == 16  # ceil(0.1 * 160)
    diagnostics = results["diagnostics"]
    for key in (
        "trigger_learnability/asr_trained_on_variations",
        "trigger_learnability/asr_label_noise_reference",
        "trigger_learnability/asr0_trained_on_variations",
        "trigger_learnability/asr0_clean_model",
        "trigger_learnability/asr_clean_variations",
        "trigger_learnability/asr_trigger_removed",
        "trigger_learnability/ra_clean_model",
        "content_kept/teacher_accuracy_on_variations",
        "artefact_activation/target_rate_on_variations",
        "trigger_survival/difference",
        "sampler_images_per_second",
        "trigger_detectability/paired_accuracy_variations",
        "trigger_detectability/paired_accuracy_sources",
    ):
        assert f"variations/{key}" in diagnostics, key
    # 16 poisoned rows, a fifth of the pairs held out.
    assert diagnostics["variations/trigger_detectability/held_out_pairs"] == 3
    for label in ("variations", "sources"):
        accuracy = diagnostics[f"variations/trigger_detectability/paired_accuracy_{label}"]
        assert accuracy * 6 == round(accuracy * 6)  # wins and half-counted ties over 3 pairs
    plan = json.load(open(os.path.join(workdir, "poison", "plan.json")))
    assert plan["num_poisoned"] == 16 and plan["target"] == 0
    for path in (
        "teacher/model",
        "generator/model",
        "generator/samples.png",
        "regenerated/variations/grid.png",
        "report/results.md",
        "report/metrics.png",
    ):
        assert os.path.exists(os.path.join(workdir, path)), path
    shards = os.listdir(os.path.join(workdir, "regenerated", "variations", "shards"))
    assert len(shards) == 3  # 160 images in shards of 64.
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    markdown = open(os.path.join(workdir, "report", "results.md")).read()
    assert "| student |" in markdown and "DER" in markdown and "ASR0" in markdown
    assert "student" in result.stdout and "CA" in result.stdout


@pytest.mark.slow
def test_rerun_skips_finished_stages(full_run, idx_dir):
    workdir, _ = full_run
    again = run_launch(smoke_args(workdir, idx_dir, "--stages=teacher,regenerate,student"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher: done already" in again.stdout
    assert "regenerate: done already" in again.stdout
    assert "student: done already" in again.stdout


@pytest.mark.slow
def test_rerun_restores_finished_models_in_a_lost_report(run_copy, idx_dir):
    before = json.load(open(os.path.join(run_copy, "report", "results.json")))["models"]
    os.remove(os.path.join(run_copy, "report", "results.json"))
    again = run_launch(smoke_args(run_copy, idx_dir, "--stages=teacher,student,report"))
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.load(open(os.path.join(run_copy, "report", "results.json")))["models"]
    for name in ("teacher", "student"):
        assert after[name]["clean_accuracy"] == before[name]["clean_accuracy"], name
    assert (
        after["student"]["defense_effectiveness_rate"]
        == (before["student"]["defense_effectiveness_rate"])
    )


@pytest.mark.slow
def test_student_killed_and_rerun_matches_uninterrupted(full_run, run_copy, idx_dir):
    workdir, _ = full_run
    shutil.rmtree(os.path.join(run_copy, "student"))
    # Checkpoints at steps 3, 5 (epoch end) and 6; the kill at 9 leaves time for one to land.
    extra = ["--stages=student", "--config.student.checkpoint_every_steps=3"]
    killed = run_launch(
        smoke_args(run_copy, idx_dir, *extra), env={"JAXCLEAN_KILL_AT": "student:9"}
    )
    assert killed.returncode == -9
    resumed = run_launch(smoke_args(run_copy, idx_dir, *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"student: resuming from step \d+", resumed.stdout)
    expected = checkpointing.load_tree(os.path.join(workdir, "student", "model"))
    got = checkpointing.load_tree(os.path.join(run_copy, "student", "model"))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_student_refuses_missing_or_foreign_inputs(full_run, idx_dir, tmp_path):
    workdir, _ = full_run
    no_teacher = str(tmp_path / "no_teacher")
    shutil.copytree(workdir, no_teacher)
    for stage in ("teacher", "student"):
        shutil.rmtree(os.path.join(no_teacher, stage))
    with pytest.raises(pipeline.ConfigError, match="no finished teacher"):
        pipeline.run(smoke_config(idx_dir), no_teacher, "student")

    no_variations = str(tmp_path / "no_variations")
    shutil.copytree(workdir, no_variations)
    shutil.rmtree(os.path.join(no_variations, "student"))
    os.remove(os.path.join(no_variations, "regenerated", "variations", "shards", "shard-00001.npz"))
    with pytest.raises(pipeline.ConfigError, match="shard 1 is missing"):
        pipeline.run(smoke_config(idx_dir), no_variations, "student")

    foreign = str(tmp_path / "foreign")
    shutil.copytree(workdir, foreign)
    shutil.rmtree(os.path.join(foreign, "student"))
    spec_path = os.path.join(foreign, "regenerated", "variations", "spec.json")
    spec = json.load(open(spec_path))
    spec["poisoned_fingerprint"] = "0" * 64
    json.dump(spec, open(spec_path, "w"))
    with pytest.raises(pipeline.ConfigError, match="another poison plan"):
        pipeline.run(smoke_config(idx_dir), foreign, "student")


@pytest.mark.slow
def test_detector_too_few_pairs_for_its_batch_is_refused_before_training(run_copy, idx_dir):
    config = smoke_config(idx_dir)
    config.diagnostics.detectability.batch_size = 64  # The smoke run has 13 training pairs.
    shutil.rmtree(os.path.join(run_copy, "learnability"))
    with pytest.raises(pipeline.ConfigError, match=r"batch_size 64 is larger than the 26 images"):
        pipeline.run(config, run_copy, "diagnostics")
    assert not os.path.exists(os.path.join(run_copy, "learnability"))


@pytest.mark.slow
def test_evaluate_models_script_restores_a_metric_added_later(run_copy, idx_dir):
    path = os.path.join(run_copy, "report", "results.json")
    results = json.load(open(path))
    expected = dict(results["models"]["student"])
    del results["models"]["student"]["untriggered_target_rate"]
    json.dump(results, open(path, "w"))
    script = os.path.join(REPO, "scripts", "evaluate_models.py")
    config = os.path.join(REPO, "configs", "smoke.py")
    args = [f"--config={config}", f"--workdir={run_copy}", f"--config.data.dir={idx_dir}"]
    out = subprocess.run(
        [sys.executable, script, *args, "--stages=student", "--update", "--by_class"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    restored = json.load(open(path))["models"]["student"]
    for key in ("clean_accuracy", "attack_success_rate", "untriggered_target_rate"):
        assert restored[key] == pytest.approx(expected[key], abs=1e-6), key
    assert restored["wall_seconds"] == expected["wall_seconds"]
    assert "ASR0" in open(os.path.join(run_copy, "report", "results.md")).read()
    # --by_class: a row per non-target class present, then where the triggered images went.
    histogram = re.search(r"predicted as each class: \[([\d, ]+)\]", out.stdout)
    assert histogram, out.stdout[-2000:]
    counts = [int(n) for n in histogram.group(1).split(",")]
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out.stdout, re.M)
    classes, sizes, _, asr = (np.array(column, dtype=float) for column in zip(*rows))
    assert smoke.get_config().attack.target not in classes
    assert sizes.sum() == sum(counts) > 0
    # The per-class rates, weighted by class size, give back the stage's ASR.
    asr_overall = np.dot(sizes, asr) / sizes.sum()
    assert asr_overall == pytest.approx(restored["attack_success_rate"], abs=1e-3)


@pytest.mark.slow
def test_distillation_fields_retrain_only_the_distilled_models(run_copy, idx_dir, capsys):
    config = smoke_config(idx_dir)
    config.student.student_corruption = 0.5
    config.student.alpha = 0.9
    config.student.temperature = 4.0
    config.student.include_trusted = True
    config.student.teacher_prior_correction = True
    # The student and kd_on_original distil with them: a finished one is refused, not reused.
    for stage in ("student", "kd_on_original"):
        with pytest.raises(StageConflict, match="student_corruption"):
            pipeline.run(config, run_copy, stage)
    # The cross-entropy baselines read the student's corruption as their own...
    for stage in ("variations_only", "trusted_only", "clean_reference"):
        with pytest.raises(StageConflict, match="corruption"):
            pipeline.run(config, run_copy, stage)
    # ... and nothing else of distillation: without it they are still done.
    config.student.corrupt_baselines = False
    pipeline.run(config, run_copy, "variations_only,trusted_only,clean_reference")
    out = capsys.readouterr().out
    for stage in ("variations_only", "trusted_only", "clean_reference"):
        assert f"{stage}: done already" in out


def test_student_seed_offset_repeats_only_the_distilled_models(run_copy, idx_dir, capsys):
    config = smoke_config(idx_dir)
    config.student.seed_offset = 1
    # A finished student of seed offset 0 is refused, not reused; the baselines, which do not
    # read the field, are still done.
    with pytest.raises(StageConflict, match="seed_offset"):
        pipeline.run(config, run_copy, "student")
    pipeline.run(config, run_copy, "variations_only,trusted_only,clean_reference")
    assert capsys.readouterr().out.count("done already") == 3
    # In a copy without it, the student trains again from another initialisation and order,
    # on the same variations, and its spec says which repeat it is.
    first = checkpointing.load_tree(os.path.join(run_copy, "student", "model"))
    shutil.rmtree(os.path.join(run_copy, "student"))
    pipeline.run(config, run_copy, "student")
    spec = json.load(open(os.path.join(run_copy, "student", "spec.json")))
    assert spec["student"]["seed_offset"] == 1
    repeat = checkpointing.load_tree(os.path.join(run_copy, "student", "model"))
    differs = jax.tree.map(lambda a, b: not np.allclose(a, b), first["params"], repeat["params"])
    assert all(jax.tree.leaves(differs))


def test_seed_summary_keeps_the_first_seed_and_adds_mean_and_spread():
    runs = [
        {"attack_success_rate": 0.01, "untriggered_target_rate": 0.03, "robust_accuracy": 0.2},
        {"attack_success_rate": 0.04, "untriggered_target_rate": 0.03, "robust_accuracy": 0.3},
    ]
    summary = generation.seed_summary("x", runs)
    assert summary["trigger_learnability/asr_x"] == 0.01
    assert summary["trigger_learnability/asr_x_mean"] == pytest.approx(0.025)
    assert summary["trigger_learnability/asr_x_std"] == pytest.approx(0.015)
    assert summary["trigger_learnability/asr0_x_std"] == pytest.approx(0.0)
    assert summary["trigger_learnability/ra_x"] == 0.2
    assert summary["trigger_learnability/ra_x_mean"] == pytest.approx(0.25)
    # One seed: no spread to report; a record without ASR0 (older runs): none claimed.
    single = generation.seed_summary("x", [{"attack_success_rate": 0.02}])
    assert single == {"trigger_learnability/asr_x": 0.02}


@pytest.mark.slow
def test_learnability_floor_trains_before_any_generator_and_the_diagnostics_reuse_it(
    run_copy, idx_dir, tmp_path, capsys
):
    config = smoke_config(idx_dir)
    # A workdir with nothing in it: the floor needs only the poison plan, which it makes.
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    summary, _ = generation.learnability_floor(experiment.Experiment(config, fresh))
    for label in ("trigger_removed", "clean_model"):
        for metric in ("asr", "asr0", "ra"):
            assert 0.0 <= summary[f"trigger_learnability/{metric}_{label}"] <= 1.0
    made = set(os.listdir(fresh))
    assert {"poison", "learnability"} <= made and not {"teacher", "generator", "regenerated"} & made
    spec = json.load(open(os.path.join(fresh, "learnability/trigger_removed_originals/spec.json")))
    assert spec["attack"]["name"] == config.attack.name and "variations" not in spec
    # In a finished run it is one of the diagnostics' own stages: trained alone, read back.
    shutil.rmtree(os.path.join(run_copy, "learnability", "trigger_removed_originals"))
    generation.learnability_floor(experiment.Experiment(config, run_copy))
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


def test_baselines_read_their_images_through_the_students_corruption():
    recipe = common.student_recipe(common.classifier_recipe())
    plain_spec = defense._spec_recipe(defense.baseline_recipe(recipe), distills=False)
    # Off by default (student_corruption 0): the spec is the one records were made with.
    assert "corruption" not in plain_spec and "corrupt_baselines" not in plain_spec
    recipe.student_corruption = 0.5
    baseline = defense.baseline_recipe(recipe)
    assert baseline.corruption == 0.5
    assert "corruption" not in recipe  # The student's own recipe is not changed.
    spec = defense._spec_recipe(baseline, distills=False)
    assert spec == {**plain_spec, "corruption": 0.5}
    # The distilled models corrupt through student_corruption; corrupt_baselines is not theirs.
    assert "corrupt_baselines" not in defense._spec_recipe(recipe, distills=True)
    explicit = common.student_recipe(common.classifier_recipe())
    explicit.update(dict(corruption=0.25, student_corruption=0.5))
    assert defense.baseline_recipe(explicit).corruption == 0.25
    recipe.corrupt_baselines = False
    assert defense._spec_recipe(defense.baseline_recipe(recipe), distills=False) == plain_spec


@pytest.mark.slow
def test_include_trusted_adds_the_trusted_images_to_the_distilled_models(
    run_copy, idx_dir, monkeypatch
):
    trained = _record_training(monkeypatch)
    config = smoke_config(idx_dir)
    config.student.include_trusted = True
    pipeline.run(config, run_copy, "student,kd_on_original,variations_only")
    student, exp = trained["student"].dataset, trained["student"].exp
    variations = generation.load_variations(exp)
    trusted = exp.splits.trusted
    assert len(student) == len(variations) + len(trusted)
    np.testing.assert_array_equal(student.images[len(variations) :], trusted.images)
    np.testing.assert_array_equal(student.labels[len(variations) :], trusted.labels)
    np.testing.assert_array_equal(student.images[: len(variations)], variations.images)
    assert trained["student"].spec["student"]["include_trusted"] is True
    assert len(trained["kd_on_original"].dataset) == len(exp.poisoned_train) + len(trusted)
    # The cross-entropy baseline on the variations is unchanged by it.
    assert len(trained["variations_only"].dataset) == len(variations)


@pytest.mark.slow
def test_prior_correction_rebases_the_distilled_models_teacher_on_the_trusted_prior(
    run_copy, idx_dir, monkeypatch
):
    trained = _record_training(monkeypatch)
    config = smoke_config(idx_dir)
    config.student.teacher_prior_correction = True
    pipeline.run(config, run_copy, "student,kd_on_original")
    exp = trained["student"].exp
    want = train.teacher_prior_correction(
        exp.poisoned_train.labels, exp.splits.trusted.labels, exp.splits.train.num_classes
    )
    # Poisoning relabels images to the target: its prior is the most inflated, so its logit
    # is the one lowered most.
    assert min(want) == want[config.attack.target] < 0
    for name in ("student", "kd_on_original"):
        step = trained[name].make_step(None, None)
        assert step.keywords["teacher_logit_offset"] == want, name
        assert trained[name].spec["student"]["teacher_prior_correction"] is True, name


def _record_training(monkeypatch) -> dict:
    """Replaces the defense stages' training with a record of each call, by model name."""
    calls = {}

    def record(exp, name, dataset, recipe, spec, **kwargs):
        calls[name] = types.SimpleNamespace(
            exp=exp, dataset=dataset, recipe=recipe, spec=spec, **kwargs
        )

    monkeypatch.setattr(defense, "train_classifier", record)
    return calls


@pytest.mark.slow
def test_the_baselines_train_through_the_students_corruption(run_copy, idx_dir, monkeypatch):
    for name in ("variations_only", "trusted_only", "clean_reference"):
        shutil.rmtree(os.path.join(run_copy, name))  # Made without the corruption.
    trained = _record_training(monkeypatch)
    config = smoke_config(idx_dir)
    config.student.student_corruption = 0.5
    pipeline.run(
        config, run_copy, "student,kd_on_original,variations_only,trusted_only,clean_reference"
    )
    for name in ("variations_only", "trusted_only", "clean_reference"):
        assert trained[name].recipe.corruption == 0.5, name
    # The distilled models' own copy is corrupted in the distillation step, not twice.
    for name in ("student", "kd_on_original"):
        assert trained[name].recipe.get("corruption", 0.0) == 0.0, name


@pytest.mark.slow
def test_kill_during_training_then_rerun_matches_uninterrupted(idx_dir, tmp_path):
    extra = ["--stages=poison,teacher", "--config.teacher.checkpoint_every_steps=3"]
    clean_dir, crash_dir = str(tmp_path / "clean"), str(tmp_path / "crash")
    uninterrupted = run_launch(smoke_args(clean_dir, idx_dir, *extra))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    killed = run_launch(
        smoke_args(crash_dir, idx_dir, *extra), env={"JAXCLEAN_KILL_AT": "teacher:7"}
    )
    assert killed.returncode == -9
    assert not os.path.exists(os.path.join(crash_dir, "teacher", "done.json"))
    resumed = run_launch(smoke_args(crash_dir, idx_dir, *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Step 6's checkpoint may still have been in flight at the kill; any finished one will do.
    resumed_from = re.search(r"resuming from step (\d+)", resumed.stdout)
    assert resumed_from and 0 < int(resumed_from.group(1)) <= 7, resumed.stdout[-2000:]
    expected = checkpointing.load_tree(os.path.join(clean_dir, "teacher", "model"))
    got = checkpointing.load_tree(os.path.join(crash_dir, "teacher", "model"))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_changed_config_is_refused_not_mixed(idx_dir, tmp_path):
    workdir = str(tmp_path / "run")
    pipeline.run(smoke_config(idx_dir, num_epochs=1), workdir, "poison,teacher")
    with pytest.raises(StageConflict, match=r"teacher.*num_epochs: 1 -> 2"):
        pipeline.run(smoke_config(idx_dir, num_epochs=2), workdir, "teacher")
    other_attack = smoke_config(idx_dir, num_epochs=1)
    other_attack.attack.rate = 0.2
    with pytest.raises(StageConflict, match="rate: 0.1 -> 0.2"):
        pipeline.run(other_attack, workdir, "poison")


def test_poison_plan_that_would_differ_is_refused(idx_dir, tmp_path):
    workdir = str(tmp_path / "run")
    pipeline.run(smoke_config(idx_dir), workdir, "poison")
    plan_path = os.path.join(workdir, "poison", "plan.json")
    plan = json.load(open(plan_path))
    plan["indices"][0] += 1  # As if the data or the sampling code had changed under the run.
    json.dump(plan, open(plan_path, "w"))
    with pytest.raises(attacks.AttackError, match="differs"):
        pipeline.run(smoke_config(idx_dir), workdir, "poison")


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda c: setattr(c.attack, "target", 12), attacks.AttackError, "target class 12"),
        (lambda c: setattr(c.attack, "rate", 1.2), attacks.AttackError, r"rate 1.2"),
        (lambda c: setattr(c.attack, "rate", -0.5), attacks.AttackError, r"rate -0.5"),
        (lambda c: setattr(c.attack.trigger, "size", 29), attacks.AttackError, "larger than"),
        (lambda c: setattr(c.data, "dir", "/nonexistent/fmnist"), data.DataError, "does not exist"),
        (lambda c: setattr(c.teacher, "num_epochs", 0), pipeline.ConfigError, "num_epochs"),
        (lambda c: setattr(c.regenerate, "strength", 0.0), pipeline.ConfigError, "strength"),
        (lambda c: setattr(c.regenerate, "strength", 1.2), pipeline.ConfigError, "strength"),
        (lambda c: setattr(c.regenerate, "steps", 0), pipeline.ConfigError, "steps"),
        (
            lambda c: setattr(c.diagnostics, "learnability_seeds", 0),
            pipeline.ConfigError,
            r"diagnostics.learnability_seeds must be an integer >= 1, got 0",
        ),
        (
            lambda c: setattr(c.diagnostics.learnability, "corruption_noise", -0.1),
            pipeline.ConfigError,
            r"diagnostics.learnability.corruption_noise -0.1 must be a standard deviation",
        ),
        (
            lambda c: setattr(c.generator, "train_split", "test"),
            pipeline.ConfigError,
            "train_split",
        ),
        (lambda c: setattr(c.student, "alpha", 1.5), pipeline.ConfigError, r"alpha 1.5"),
        (lambda c: setattr(c.student, "alpha", -0.1), pipeline.ConfigError, "alpha"),
        (lambda c: setattr(c.student, "temperature", 0.0), pipeline.ConfigError, "temperature"),
        (
            lambda c: setattr(c.student, "seed_offset", -1),
            pipeline.ConfigError,
            r"student.seed_offset -1 must be an integer >= 0",
        ),
        (
            lambda c: setattr(c.student, "student_corruption", 1.5),
            pipeline.ConfigError,
            r"student.student_corruption 1.5",
        ),
        (
            lambda c: c.student.update(include_trusted=True, select="best"),
            pipeline.ConfigError,
            r"include_trusted trains on the trusted split",
        ),
        (
            lambda c: (
                setattr(c.student, "teacher_prior_correction", True),
                setattr(c.data, "trusted_size", 0),
            ),
            pipeline.ConfigError,
            r"teacher_prior_correction takes the clean label prior from the trusted split",
        ),
        (
            lambda c: setattr(c.generator.encoder, "corruption", 1.5),
            pipeline.ConfigError,
            r"generator.encoder.corruption 1.5",
        ),
        (
            lambda c: setattr(c.generator.encoder, "invariance_weight", -1.0),
            pipeline.ConfigError,
            r"generator.encoder.invariance_weight -1.0 must be >= 0",
        ),
        (
            lambda c: setattr(c.generator, "cond_corruption", -0.5),
            pipeline.ConfigError,
            r"generator.cond_corruption -0.5",
        ),
        (
            lambda c: c.generator.encoder_invariance.update(num_epochs=2, min_contrast=0.0),
            pipeline.ConfigError,
            r"generator.encoder_invariance.min_contrast 0.0 must be in \(0, 1\]",
        ),
        (
            lambda c: c.generator.encoder_invariance.update(num_epochs=-1),
            pipeline.ConfigError,
            r"generator.encoder_invariance.num_epochs must be >= 0",
        ),
    ],
)
def test_bad_input_fails_before_any_work(idx_dir, tmp_path, mutate, error, message):
    config = smoke_config(idx_dir)
    mutate(config)
    workdir = tmp_path / "run"
    with pytest.raises(error, match=message):
        pipeline.run(config, str(workdir), "poison,teacher")
    assert not (workdir / "teacher").exists()


def test_unknown_stage_is_refused():
    with pytest.raises(pipeline.ConfigError, match="unknown stage.*'techer'"):
        pipeline.parse_stages("poison,techer")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_unwritable_workdir_as_user(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(pipeline.ConfigError, match="not writable"):
        pipeline.check_workdir(str(locked / "run"))


def test_workdir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(pipeline.ConfigError, match="not writable"):
        pipeline.check_workdir(str(blocker / "run"))


@pytest.mark.slow
def test_launch_reports_bad_input_clearly(idx_dir, tmp_path):
    unknown_key = run_launch(
        smoke_args(str(tmp_path / "a"), idx_dir, "--config.teacher.nm_epochs=3")
    )
    assert unknown_key.returncode != 0
    assert "nm_epochs" in unknown_key.stderr
    bad_stage = run_launch(smoke_args(str(tmp_path / "b"), idx_dir, "--stages=teachr"))
    assert bad_stage.returncode == 2
    assert "unknown stage(s) ['teachr']" in bad_stage.stderr
    bad_dir = run_launch(smoke_args(str(tmp_path / "c"), str(tmp_path / "missing")))
    assert bad_dir.returncode == 2
    assert "does not exist" in bad_dir.stderr and "Traceback" not in bad_dir.stderr


def test_configs_load_and_validate():
    import importlib

    for name in (
        "fashion_mnist_badnets",
        "fashion_mnist_blended",
        "fashion_mnist_badnets_demo",
        "fashion_mnist_badnets_premise",
        "smoke",
    ):
        config = importlib.import_module(f"configs.{name}").get_config()
        pipeline.validate_config(config)
    for name in ("imagenette_sd_variations", "cifar10_sd_img2img"):
        module = importlib.import_module(f"configs.{name}")
        for attack in ("badnets", "blended"):
            config = module.get_config(attack)
            pipeline.validate_config(config)
            assert config.attack.name == attack
        with pytest.raises(ValueError, match="unknown attack 'wanet'"):
            module.get_config("wanet")
    paper = importlib.import_module("configs.imagenette_sd_variations").get_config("badnets")
    assert (paper.regenerate.steps, paper.regenerate.guidance, paper.generator.resolution) == (
        50,
        7.5,
        512,
    )
    assert paper.attack.trigger.size == 9 and paper.teacher.model == "resnet101"
    assert os.path.exists(os.path.join(REPO, "launch.py"))


def test_regenerate_without_a_generator_is_refused(idx_dir, tmp_path):
    with pytest.raises(pipeline.ConfigError, match="no generator checkpoint"):
        pipeline.run(smoke_config(idx_dir), str(tmp_path / "run"), "regenerate")


def test_generator_for_another_image_size_is_refused(idx_dir, tmp_path):
    workdir = tmp_path / "run"
    (workdir / "generator").mkdir(parents=True)
    (workdir / "generator" / "done.json").write_text(
        json.dumps({"spec_fingerprint": "x", "image_shape": [32, 32, 3]})
    )
    with pytest.raises(pipeline.ConfigError, match=r"makes \[32, 32, 3\] images"):
        pipeline.run(smoke_config(idx_dir), str(workdir), "regenerate")


@pytest.mark.slow
def test_pretrained_generator_is_adopted_only_with_matching_provenance(full_run, idx_dir, tmp_path):
    workdir, _ = full_run
    config = smoke_config(idx_dir)
    config.generator.pretrained = os.path.join(workdir, "generator")
    adopted = str(tmp_path / "adopted")
    pipeline.run(config, adopted, "generator,regenerate")
    # Its own copy of the weights, and the same variations as the run it came from.
    assert os.path.isdir(os.path.join(adopted, "generator", "model"))
    for shard in ("shard-00000.npz", "shard-00002.npz"):
        ours = np.load(os.path.join(adopted, "regenerated", "variations", "shards", shard))
        theirs = np.load(os.path.join(workdir, "regenerated", "variations", "shards", shard))
        np.testing.assert_array_equal(ours["images"], theirs["images"])
    other = smoke_config(idx_dir)
    other.generator.pretrained = os.path.join(workdir, "generator")
    other.generator.cond_dropout = 0.2
    with pytest.raises(pipeline.ConfigError, match="made from another config.*cond_dropout"):
        pipeline.run(other, str(tmp_path / "other"), "generator")


@pytest.mark.slow
def test_encoder_invariance_phase_is_added_to_a_generator_made_without_it(
    full_run, idx_dir, tmp_path
):
    """A run that wants the phase adopts a generator made without it and adds it (the encoder
    changes, nothing else); a generator that has had it is adopted as it is; one that has had
    another phase is refused."""
    workdir, _ = full_run
    config = smoke_config(idx_dir)
    config.generator.pretrained = os.path.join(workdir, "generator")
    config.generator.encoder_invariance.update(num_epochs=1, batch_size=16)
    tuned_dir = str(tmp_path / "tuned")
    pipeline.run(config, tuned_dir, "generator")
    theirs = checkpointing.load_tree(os.path.join(workdir, "generator", "model"))
    tuned = checkpointing.load_tree(os.path.join(tuned_dir, "generator", "model"))
    jax.tree.map(np.testing.assert_array_equal, tuned["unet"], theirs["unet"])
    changed = jax.tree_util.tree_flatten_with_path(
        jax.tree.map(
            lambda a, b: not np.array_equal(a, b),
            tuned["encoder"]["params"],
            theirs["encoder"]["params"],
        )
    )[0]
    # Every layer the embedding is made of moved (the classifier head, which it skips, gets no
    # gradient: only the EMA's rounding touches it).
    assert all(moved for path, moved in changed if "Dense" not in jax.tree_util.keystr(path))
    spec = json.load(open(os.path.join(tuned_dir, "generator", "spec.json")))
    assert spec["generator"]["encoder_invariance"]["num_epochs"] == 1

    config.generator.pretrained = os.path.join(tuned_dir, "generator")
    again = str(tmp_path / "again")
    pipeline.run(config, again, "generator")
    adopted = checkpointing.load_tree(os.path.join(again, "generator", "model"))
    jax.tree.map(np.testing.assert_array_equal, adopted, tuned)
    assert not os.path.exists(os.path.join(again, "generator", "encoder_invariance_checkpoints"))

    config.generator.encoder_invariance.num_epochs = 2
    with pytest.raises(pipeline.ConfigError, match="encoder_invariance"):
        pipeline.run(config, str(tmp_path / "other"), "generator")


@pytest.mark.slow
def test_shipped_generator_serves_other_attacks_and_subsets(full_run, idx_dir, tmp_path):
    """The export a repo ships (spec, done, model.msgpack) is adopted by any run that shares
    the trusted split, whatever its attack or training subset; a changed file is refused."""
    workdir, _ = full_run
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in ("spec.json", "done.json", "model.msgpack"):
        shutil.copy(os.path.join(workdir, "generator", name), shipped / name)
    config = smoke_config(idx_dir)
    config.attack = smoke.get_config().attack.copy_and_resolve_references()
    config.attack.name = "blended"
    config.attack.trigger = dict(pattern="noise", ratio=0.2, noise_seed=42)
    config.data.train_subset = 100
    config.generator.pretrained = str(shipped)
    adopted = str(tmp_path / "adopted")
    pipeline.run(config, adopted, "generator")
    ours = checkpointing.load_tree(os.path.join(adopted, "generator", "model"))
    theirs = checkpointing.load_tree(os.path.join(workdir, "generator", "model"))
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)

    blob = bytearray((shipped / "model.msgpack").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (shipped / "model.msgpack").write_bytes(bytes(blob))
    with pytest.raises(pipeline.ConfigError, match="sha256"):
        pipeline.run(config, str(tmp_path / "corrupt"), "generator")


def _blended_reusing(idx_dir, workdir, reuse_from=""):
    config = smoke_config(idx_dir)
    config.attack.name = "blended"
    config.attack.trigger = dict(pattern="noise", ratio=0.2, noise_seed=42)
    config.generator.pretrained = os.path.join(workdir, "generator")
    config.regenerate.reuse_from = reuse_from
    return config


def _shards(variations):
    directory = os.path.join(variations, "shards")
    arrays = [np.load(os.path.join(directory, name)) for name in sorted(os.listdir(directory))]
    return {k: np.concatenate([a[k] for a in arrays]) for k in ("images", "source_digests")}


@pytest.mark.slow
def test_variations_of_another_attack_are_reused_where_the_images_agree(
    full_run, idx_dir, tmp_path
):
    """A Blended run reusing the BadNets run's variations copies the rows whose source image
    and label are the same, samples the rest, and ends with the variations it would have made."""
    workdir, _ = full_run
    source = os.path.join(workdir, "regenerated", "variations")
    reusing, fresh = str(tmp_path / "reusing"), str(tmp_path / "fresh")
    pipeline.run(_blended_reusing(idx_dir, workdir, source), reusing, "generator,regenerate")
    pipeline.run(_blended_reusing(idx_dir, workdir), fresh, "generator,regenerate")

    ours, theirs = _shards(os.path.join(reusing, "regenerated", "variations")), _shards(source)
    scratch = _shards(os.path.join(fresh, "regenerated", "variations"))
    same_source = ours["source_digests"] == theirs["source_digests"]
    # The blended rows (16 poisoned of 160, and BadNets' own 16 where the plans differ) are not.
    assert 0 < (~same_source).sum() < len(same_source) and (~same_source).sum() >= 16
    np.testing.assert_array_equal(ours["images"][same_source], theirs["images"][same_source])
    done = json.load(open(os.path.join(reusing, "regenerated", "variations", "done.json")))
    assert done["images_reused"] == same_source.sum()
    # Against a run that sampled every row: sampled rows come from other batch shapes, so they
    # may sit one uint8 step away in rare pixels; nothing more.
    np.testing.assert_array_equal(ours["source_digests"], scratch["source_digests"])
    diff = np.abs(ours["images"].astype(int) - scratch["images"].astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())

    # A higher black level is applied to the copied rows; a lower one cannot undo the source's.
    darker = _blended_reusing(idx_dir, workdir, source)
    darker.regenerate.black_level = 40
    pipeline.run(darker, str(tmp_path / "darker"), "generator,regenerate")
    cleared = _shards(os.path.join(tmp_path / "darker", "regenerated", "variations"))
    expected = np.where(theirs["images"] < 40, 0, theirs["images"])
    np.testing.assert_array_equal(cleared["images"][same_source], expected[same_source])
    assert (cleared["images"] < 40).sum() == (cleared["images"] == 0).sum()
    assert (theirs["images"][same_source] < 40).sum() > (theirs["images"][same_source] == 0).sum()
    lighter = _blended_reusing(
        idx_dir, workdir, os.path.join(tmp_path / "darker", "regenerated", "variations")
    )
    with pytest.raises(pipeline.ConfigError, match="black_level 40 is above"):
        pipeline.run(lighter, str(tmp_path / "lighter"), "generator,regenerate")

    other = _blended_reusing(idx_dir, workdir, source)
    other.regenerate.guidance = 5.0
    with pytest.raises(pipeline.ConfigError, match="another generator or sampler.*guidance"):
        pipeline.run(other, str(tmp_path / "other"), "generator,regenerate")
    missing = _blended_reusing(idx_dir, workdir, str(tmp_path / "nowhere"))
    with pytest.raises(pipeline.ConfigError, match="holds no finished variations"):
        pipeline.run(missing, str(tmp_path / "missing"), "generator,regenerate")


@pytest.mark.slow
def test_attack_free_classifiers_of_another_attack_are_adopted_not_retrained(
    full_run, idx_dir, tmp_path
):
    """clean_reference and trusted_only see no poisoned image: a Blended run adopts the BadNets
    run's weights, evaluates them against the blend, and matches a Blended run that trained
    them itself."""
    workdir, _ = full_run
    stages = "clean_reference,trusted_only"
    adopting, fresh = str(tmp_path / "adopting"), str(tmp_path / "fresh")
    config = _blended_reusing(idx_dir, workdir)
    config.reuse_attack_free_from = workdir
    adopted = pipeline.run(config, adopting, stages)["models"]
    trained = pipeline.run(_blended_reusing(idx_dir, workdir), fresh, stages)["models"]
    source = json.load(open(os.path.join(workdir, "report", "results.json")))["models"]
    for name in ("clean_reference", "trusted_only"):
        assert not os.path.exists(os.path.join(adopting, name, "checkpoints"))
        done = json.load(open(os.path.join(adopting, name, "done.json")))
        assert done["adopted_from"] == os.path.abspath(os.path.join(workdir, name))
        ours = checkpointing.load_tree(os.path.join(adopting, name, "model"))
        theirs = checkpointing.load_tree(os.path.join(workdir, name, "model"))
        jax.tree.map(np.testing.assert_array_equal, ours, theirs)
        for metric in ("clean_accuracy", "attack_success_rate", "robust_accuracy"):
            assert adopted[name][metric] == trained[name][metric], (name, metric)
        # The same weights: the same clean accuracy.
        assert adopted[name]["clean_accuracy"] == source[name]["clean_accuracy"]

    otherwise = _blended_reusing(idx_dir, workdir)
    otherwise.reuse_attack_free_from = workdir
    otherwise.student.num_epochs += 1
    with pytest.raises(pipeline.ConfigError, match="trained otherwise.*num_epochs"):
        pipeline.run(otherwise, str(tmp_path / "otherwise"), "clean_reference")
    nowhere = _blended_reusing(idx_dir, workdir)
    nowhere.reuse_attack_free_from = str(tmp_path / "nowhere")
    with pytest.raises(pipeline.ConfigError, match="no finished clean_reference"):
        pipeline.run(nowhere, str(tmp_path / "nowhere_run"), "clean_reference")


def test_without_unset_drops_only_the_named_options_that_are_off():
    section = {"a": 0.0, "b": 0.5, "c": 0, "d": False, "e": ""}
    # An option added later is left out while off (so older specs still match); an option
    # not named, or named and on, is kept whatever its value.
    assert without_unset(section, ("a", "b", "d", "e", "absent")) == {"b": 0.5, "c": 0}
    assert without_unset(section, ()) == section


def test_encoder_invariance_weight_trains_another_encoder_and_enters_specs_only_when_on(
    idx_dir, tmp_path
):
    plain, invariant = smoke_config(idx_dir), smoke_config(idx_dir)
    invariant.generator.encoder.invariance_weight = 1.0
    weights = {}
    for name, config in (("plain", plain), ("invariant", invariant)):
        pipeline.run(config, str(tmp_path / name), "encoder")
        weights[name] = checkpointing.load_tree(str(tmp_path / name / "encoder" / "model"))
        spec = json.load(open(tmp_path / name / "encoder" / "spec.json"))
        generator_spec = generation.generator_weights_config(config.generator)
        if name == "plain":  # Off: the specs of encoders and generators made before it existed.
            assert "invariance_weight" not in spec["encoder"]
            assert "invariance_weight" not in generator_spec["encoder"]
        else:
            assert spec["encoder"]["invariance_weight"] == 1.0
            assert generator_spec["encoder"]["invariance_weight"] == 1.0
    # The same seed, data order and initialisation: only the objective differs.
    moved = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: not np.allclose(a, b),
            weights["plain"]["params"],
            weights["invariant"]["params"],
        )
    )
    assert all(moved)
