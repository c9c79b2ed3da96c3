"""The pipeline as users run it: launch.py end to end, resume, the figures it must keep, and
the bad input it refuses before any work."""

import json
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, run_launch, smoke_args, smoke_config

from configs import smoke
from jaxclean import attacks, data, pipeline

sys.path.insert(0, os.path.join(REPO, "tests", "reference"))
import record  # noqa: E402  The recorder of the reference figures, beside them.


@pytest.mark.slow
def test_launch_runs_every_stage_and_reports(smoke_run):
    workdir, result = smoke_run
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
    assert results["experiment"]["num_poisoned"] == 14  # ceil(0.1 * the 140 non-target images)
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
    # 14 poisoned rows, a fifth of the pairs held out.
    assert diagnostics["variations/trigger_detectability/held_out_pairs"] == 3
    for label in ("variations", "sources"):
        accuracy = diagnostics[f"variations/trigger_detectability/paired_accuracy_{label}"]
        assert accuracy * 6 == round(accuracy * 6)  # wins and half-counted ties over 3 pairs
    plan = json.load(open(os.path.join(workdir, "poison", "plan.json")))
    assert plan["num_poisoned"] == 14 and plan["target"] == 0
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
    assert results["schema_version"] == 1


@pytest.mark.slow
def test_smoke_figures_and_shipped_variations_are_those_recorded(smoke_run):
    """Bit for bit what tests/reference/record.py recorded: a change that moves them is a
    change of the method's figures, and must rerecord them (and say so)."""
    with open(record.SMOKE_METRICS) as f:
        expected = json.load(f)
    with open(os.path.join(smoke_run[0], "report", "results.json")) as f:
        got = record.figures(json.load(f))
    assert got == expected
    with np.load(record.SHIPPED_VARIATIONS) as f:
        np.testing.assert_array_equal(record.shipped_variations(), f["images"])


@pytest.mark.slow
def test_rerun_skips_finished_stages(smoke_run, idx_dir):
    workdir, _ = smoke_run
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
            lambda c: setattr(c.generator, "encoder_invariance_weight", -1.0),
            pipeline.ConfigError,
            r"generator.encoder_invariance_weight -1.0 must be >= 0",
        ),
        (
            lambda c: setattr(c.generator, "condition_corruption", -0.5),
            pipeline.ConfigError,
            r"generator.condition_corruption -0.5",
        ),
    ],
)
def test_bad_input_fails_before_any_work(idx_dir, tmp_path, mutate, error, message):
    config = smoke_config(idx_dir)
    mutate(config)
    workdir = tmp_path / "run"
    with pytest.raises(error, match=message):
        pipeline.run(config, str(workdir), "poison,teacher")
    assert not workdir.exists()


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
        "fashion_mnist_wanet",
        "fashion_mnist_sig",
        "fashion_mnist_bpp",
        "fashion_mnist_badnets_demo",
        "fashion_mnist_badnets_premise",
        "smoke",
    ):
        config = importlib.import_module(f"configs.{name}").get_config()
        if name == "smoke":  # Its data are what tests write; it names no directory itself.
            with pytest.raises(data.DataError, match="set --config.data.dir"):
                pipeline.validate_config(config)
            config.data.dir = "/tests/write/idx/files"
        pipeline.validate_config(config)
    for name in ("imagenette_sd_variations", "cifar10_sd_img2img"):
        module = importlib.import_module(f"configs.{name}")
        for attack in ("badnets", "blended"):
            config = module.get_config(attack)
            pipeline.validate_config(config)
            assert config.attack.name == attack
        for attack in ("wanet", "sig", "bpp"):
            pipeline.validate_config(module.get_config(attack))
        with pytest.raises(ValueError, match="unknown attack 'trojan'"):
            module.get_config("trojan")
    paper = importlib.import_module("configs.imagenette_sd_variations").get_config("badnets")
    assert (paper.regenerate.steps, paper.regenerate.guidance, paper.generator.resolution) == (
        50,
        7.5,
        512,
    )
    assert paper.attack.trigger.size == 9 and paper.teacher.model == "resnet101"
    assert os.path.exists(os.path.join(REPO, "launch.py"))


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
