"""Stages teacher, student, kd_on_original and the cross-entropy baselines: what each trains
on, which config fields it answers to, resume after kill -9, and the inputs it refuses."""

import json
import os
import re
import shutil
import types

import jax
import numpy as np
import pytest
from conftest import blended_reusing, run_launch, smoke_args, smoke_config

from configs import common
from jaxclean import checkpointing, pipeline, steps
from jaxclean.artifacts import StageConflict
from jaxclean.stages import classifiers, regenerate


@pytest.mark.slow
def test_student_killed_and_rerun_matches_uninterrupted(smoke_run, run_copy, idx_dir):
    workdir, _ = smoke_run
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
def test_student_refuses_missing_or_foreign_inputs(smoke_run, idx_dir, tmp_path):
    workdir, _ = smoke_run
    no_teacher = str(tmp_path / "no_teacher")
    shutil.copytree(workdir, no_teacher)
    for stage in ("teacher", "student"):
        shutil.rmtree(os.path.join(no_teacher, stage))
    missing = "student needs teacher.*--stages=teacher,student"
    with pytest.raises(pipeline.ConfigError, match=missing):
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
    # The cross-entropy baselines have a recipe of their own: distillation does not touch them.
    pipeline.run(config, run_copy, "variations_only,trusted_only,clean_reference")
    out = capsys.readouterr().out
    for stage in ("variations_only", "trusted_only", "clean_reference"):
        assert f"{stage}: done already" in out
    # Their own corruption is theirs to change, and refuses what was made without it.
    config.baselines.corruption = 0.5
    for stage in ("variations_only", "trusted_only", "clean_reference"):
        with pytest.raises(StageConflict, match="corruption: 0.0 -> 0.5"):
            pipeline.run(config, run_copy, stage)


@pytest.mark.slow
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


def test_baselines_read_what_the_student_reads_less_distillation():
    student = common.student_recipe(common.classifier_recipe(num_epochs=9, width=8))
    baselines = common.baselines_recipe(student)
    assert set(baselines) == set(common.classifier_recipe())  # No distillation field.
    assert (baselines.num_epochs, baselines.width, baselines.corruption) == (9, 8, 0.0)
    # The student's own copy is corrupted in the distillation step; the baselines read theirs
    # through the same corruption as their input corruption.
    student.student_corruption = 0.25
    assert common.baselines_recipe(student).corruption == 0.25
    assert student.corruption == 0.0  # The student's recipe is not changed.
    for module in ("fashion_mnist_badnets", "fashion_mnist_blended"):
        config = __import__(f"configs.{module}", fromlist=["get_config"]).get_config()
        assert config.baselines.corruption == config.student.student_corruption == 0.25
        assert config.baselines.num_epochs == config.student.num_epochs


@pytest.mark.slow
def test_include_trusted_adds_the_trusted_images_to_the_distilled_models(
    run_copy, idx_dir, monkeypatch
):
    trained = _record_training(monkeypatch)
    config = smoke_config(idx_dir)
    config.student.include_trusted = True
    pipeline.run(config, run_copy, "student,kd_on_original,variations_only")
    student, exp = trained["student"].dataset, trained["student"].exp
    variations = regenerate.load_variations(exp)
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
    want = steps.teacher_prior_correction(
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

    monkeypatch.setattr(classifiers, "train_classifier", record)
    return calls


@pytest.mark.slow
def test_the_baselines_train_through_their_corruption(run_copy, idx_dir, monkeypatch):
    for name in ("variations_only", "trusted_only", "clean_reference"):
        shutil.rmtree(os.path.join(run_copy, name))  # Made without the corruption.
    trained = _record_training(monkeypatch)
    config = smoke_config(idx_dir)
    config.student.student_corruption = 0.5
    config.baselines = common.baselines_recipe(config.student)
    pipeline.run(
        config, run_copy, "student,kd_on_original,variations_only,trusted_only,clean_reference"
    )
    for name in ("variations_only", "trusted_only", "clean_reference"):
        assert trained[name].recipe.corruption == 0.5, name
    # The distilled models' own copy is corrupted in the distillation step, not twice.
    for name in ("student", "kd_on_original"):
        assert trained[name].recipe.corruption == 0.0, name


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


@pytest.mark.slow
def test_attack_free_classifiers_of_another_attack_are_adopted_not_retrained(
    smoke_run, idx_dir, tmp_path
):
    """clean_reference and trusted_only see no poisoned image: a Blended run adopts the BadNets
    run's weights, evaluates them against the blend, and matches a Blended run that trained
    them itself."""
    workdir, _ = smoke_run
    stages = "clean_reference,trusted_only"
    adopting, fresh = str(tmp_path / "adopting"), str(tmp_path / "fresh")
    config = blended_reusing(idx_dir, workdir)
    config.reuse_attack_free_from = workdir
    adopted = pipeline.run(config, adopting, stages)["models"]
    trained = pipeline.run(blended_reusing(idx_dir, workdir), fresh, stages)["models"]
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

    otherwise = blended_reusing(idx_dir, workdir)
    otherwise.reuse_attack_free_from = workdir
    otherwise.baselines.num_epochs += 1
    with pytest.raises(pipeline.ConfigError, match="trained otherwise.*num_epochs"):
        pipeline.run(otherwise, str(tmp_path / "otherwise"), "clean_reference")
    nowhere = blended_reusing(idx_dir, workdir)
    nowhere.reuse_attack_free_from = str(tmp_path / "nowhere")
    with pytest.raises(pipeline.ConfigError, match="no finished clean_reference"):
        pipeline.run(nowhere, str(tmp_path / "nowhere_run"), "clean_reference")
