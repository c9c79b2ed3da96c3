"""The pipeline as users run it: launch.py end to end, resume after kill -9, and bad input."""

import json
import os
import re
import stat

import jax
import numpy as np
import pytest
from conftest import REPO, run_launch, smoke_args

from configs import smoke
from jaxclean import attacks, checkpointing, data, pipeline
from jaxclean.artifacts import StageConflict


def smoke_config(data_dir, **teacher):
    config = smoke.get_config()
    config.data.dir = data_dir
    config.teacher.update(teacher)
    return config


@pytest.mark.slow
def test_launch_runs_teacher_end_to_end_and_skips_when_done(idx_dir, tmp_path):
    workdir = str(tmp_path / "run")
    first = run_launch(smoke_args(workdir, idx_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.load(open(os.path.join(workdir, "report", "results.json")))
    teacher = results["models"]["teacher"]
    for key in ("clean_accuracy", "attack_success_rate", "robust_accuracy"):
        assert 0.0 <= teacher[key] <= 1.0
    assert results["experiment"]["num_poisoned"] == 16  # ceil(0.1 * 160)
    plan = json.load(open(os.path.join(workdir, "poison", "plan.json")))
    assert plan["num_poisoned"] == 16 and plan["target"] == 0
    assert os.path.isdir(os.path.join(workdir, "teacher", "model"))
    assert os.path.exists(os.path.join(workdir, "report", "results.md"))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    assert "teacher" in first.stdout and "CA" in first.stdout
    second = run_launch(smoke_args(workdir, idx_dir))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "teacher: done already" in second.stdout


@pytest.mark.slow
def test_kill_during_training_then_rerun_matches_uninterrupted(idx_dir, tmp_path):
    extra = ["--stages=poison,teacher", "--config.teacher.checkpoint_every_steps=3"]
    clean_dir, crash_dir = str(tmp_path / "clean"), str(tmp_path / "crash")
    uninterrupted = run_launch(smoke_args(clean_dir, idx_dir, *extra))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    killed = run_launch(smoke_args(crash_dir, idx_dir, *extra),
                        env={"JAXCLEAN_KILL_AT": "teacher:7"})
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
        (lambda c: setattr(c.generator, "train_split", "test"), pipeline.ConfigError,
         "train_split"),
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
    unknown_key = run_launch(smoke_args(str(tmp_path / "a"), idx_dir, "--config.teacher.nm_epochs=3"))
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

    for name in ("fashion_mnist_badnets", "fashion_mnist_blended", "smoke"):
        config = importlib.import_module(f"configs.{name}").get_config()
        pipeline.validate_config(config)
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
