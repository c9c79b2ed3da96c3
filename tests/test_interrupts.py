"""Interrupts, a full disk and damaged outputs, through launch.py: each ends with one line that
says what to do, leaves no half-written file, and the same command (or the one the line
names) resumes to what an uninterrupted run makes, bit for bit."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, run_launch, smoke_args, smoke_config

from jaxclean import checkpointing, pipeline, results
from jaxclean.artifacts import CorruptOutput

TEACHER = ["--stages=poison,teacher", "--config.teacher.checkpoint_every_steps=3"]


def _weights(workdir: str, stage: str) -> list:
    return jax.tree.leaves(checkpointing.load_tree(os.path.join(workdir, stage, "model")))


def _assert_same_weights(expected: str, got: str, stage: str) -> None:
    for a, b in zip(_weights(expected, stage), _weights(got, stage), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _assert_clean_stop(result, status: int, says: str) -> None:
    assert result.returncode == status, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert says in last, last
    for bad in ("Traceback", "Segmentation fault", "Fatal Python error"):
        assert bad not in result.stderr, result.stderr[-2000:]


def _half_written(workdir: str) -> list[str]:
    """Temporary files an atomic write would have left, had it been cut short."""
    return [
        os.path.join(root, name)
        for root, _, files in os.walk(workdir)
        for name in files
        if name.startswith(".tmp-")
    ]


@pytest.fixture(scope="module")
def teacher_run(idx_dir, tmp_path_factory):
    """poison and teacher, uninterrupted: what every interrupted teacher must end as."""
    workdir = str(tmp_path_factory.mktemp("teacher") / "run")
    result = run_launch(smoke_args(workdir, idx_dir, *TEACHER))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, name, status",
    [("teacher:7", "INT", 130), ("teacher/checkpoint:6", "TERM", 143)],
    ids=["sigint-in-training", "sigterm-during-checkpoint-save"],
)
def test_interrupted_training_resumes_bit_identical(
    teacher_run, idx_dir, tmp_path, point, name, status
):
    workdir = str(tmp_path / "run")
    env = {"JAXCLEAN_KILL_AT": point, "JAXCLEAN_KILL_SIGNAL": name}
    stopped = run_launch(smoke_args(workdir, idx_dir, *TEACHER), env=env)
    _assert_clean_stop(stopped, status, f"interrupted by SIG{name}")
    assert "rerun the same command" in stopped.stderr
    assert not os.path.exists(os.path.join(workdir, "teacher", "done.json"))
    assert not _half_written(workdir)
    resumed = run_launch(smoke_args(workdir, idx_dir, *TEACHER))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # From the last checkpoint that landed before the stop (a save in flight may not have).
    resumed_from = re.search(r"teacher: resuming from step (\d+)", resumed.stdout)
    assert resumed_from and int(resumed_from.group(1)) in (3, 5, 6), resumed.stdout[-2000:]
    _assert_same_weights(teacher_run, workdir, "teacher")


@pytest.mark.slow
def test_sigint_during_compilation_stops_cleanly(idx_dir, tmp_path):
    """Ctrl-C while XLA compiles the first step: the signal is taken when compilation returns;
    the process must then stop with its one line, not crash at exit."""
    args = [sys.executable, os.path.join(REPO, "launch.py"), *smoke_args(str(tmp_path), idx_dir)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # Compile for real, not from the tests' cache.
    process = subprocess.Popen(
        args + ["--stages=poison,teacher"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:
        if line.startswith("teacher: training"):  # The first step compiles next.
            process.send_signal(signal.SIGINT)
            break
    stdout, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    _assert_clean_stop(result, 130, "interrupted by SIGINT")


@pytest.mark.slow
def test_interrupted_or_full_regeneration_resumes_bit_identical(smoke_run, run_copy, idx_dir):
    shutil.rmtree(os.path.join(run_copy, "regenerated"))
    stages = ["--stages=regenerate"]
    env = {"JAXCLEAN_KILL_AT": "regenerate:1", "JAXCLEAN_KILL_SIGNAL": "TERM"}
    stopped = run_launch(smoke_args(run_copy, idx_dir, *stages), env=env)
    _assert_clean_stop(stopped, 143, "interrupted by SIGTERM")
    shards = os.path.join(run_copy, "regenerated", "variations", "shards")
    assert sorted(os.listdir(shards)) == ["shard-00000.npz", "shard-00001.npz"]
    # The disk fills as the last shard is written: named, nothing half-written, and the rerun
    # once there is space again finishes the variations.
    full = run_launch(
        smoke_args(run_copy, idx_dir, *stages), env={"JAXCLEAN_DISK_FULL": "shard-00002"}
    )
    _assert_clean_stop(full, 1, "no space left on the device writing")
    assert "shard-00002.npz" in full.stderr.strip().splitlines()[-1]
    assert not _half_written(run_copy)
    resumed = run_launch(smoke_args(run_copy, idx_dir, *stages))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in os.listdir(os.path.join(smoke_run[0], "regenerated", "variations", "shards")):
        ours = np.load(os.path.join(shards, name))["images"]
        theirs = np.load(os.path.join(smoke_run[0], "regenerated/variations/shards", name))
        np.testing.assert_array_equal(ours, theirs["images"])


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_then_resume(teacher_run, idx_dir, tmp_path):
    workdir = str(tmp_path / "run")
    full = run_launch(
        smoke_args(workdir, idx_dir, *TEACHER), env={"JAXCLEAN_DISK_FULL": "checkpoints/6"}
    )
    _assert_clean_stop(full, 1, "no space left on the device writing")
    assert os.path.join("teacher", "checkpoints", "6") in full.stderr
    resumed = run_launch(smoke_args(workdir, idx_dir, *TEACHER))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(teacher_run, workdir, "teacher")


@pytest.mark.slow
def test_interrupted_report_is_rewritten_whole(run_copy, idx_dir):
    os.remove(os.path.join(run_copy, "report", "results.md"))
    env = {"JAXCLEAN_KILL_AT": "report:1", "JAXCLEAN_KILL_SIGNAL": "INT"}
    stopped = run_launch(smoke_args(run_copy, idx_dir, "--stages=report"), env=env)
    _assert_clean_stop(stopped, 130, "interrupted by SIGINT")
    assert not _half_written(run_copy)
    resumed = run_launch(smoke_args(run_copy, idx_dir, "--stages=report"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "| student |" in open(os.path.join(run_copy, "report", "results.md")).read()


@pytest.mark.slow
def test_a_corrupt_checkpoint_names_its_stage_and_the_command_that_redoes_it(
    teacher_run, idx_dir, tmp_path
):
    workdir = str(tmp_path / "run")
    env = {"JAXCLEAN_KILL_AT": "teacher:7"}  # kill -9 after the checkpoints of steps 3 and 6.
    assert run_launch(smoke_args(workdir, idx_dir, *TEACHER), env=env).returncode == -9
    checkpoints = os.path.join(workdir, "teacher", "checkpoints")
    latest = max(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    for root, _, files in os.walk(os.path.join(checkpoints, str(latest))):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(0, os.path.getsize(f.name) // 3))
    refused = run_launch(smoke_args(workdir, idx_dir, *TEACHER))
    _assert_clean_stop(refused, 2, "--redo=teacher")
    line = refused.stderr.strip().splitlines()[-1]
    assert "corrupt or truncated" in line and os.path.join(checkpoints, str(latest)) in line
    # The line ends with the exact command that redoes the stage; run it.
    command = shlex.split(line.split("redo that stage with: ", 1)[1])
    assert command[0] == "python" and command[-1] == "--redo=teacher"
    redone = run_launch(command[2:])
    assert redone.returncode == 0, redone.stderr[-3000:]
    assert "redo: removed" in redone.stdout
    _assert_same_weights(teacher_run, workdir, "teacher")


@pytest.mark.slow
def test_damaged_outputs_read_by_a_later_stage_name_the_stage_that_wrote_them(run_copy, idx_dir):
    config = smoke_config(idx_dir)
    shutil.rmtree(os.path.join(run_copy, "student"))
    shard = os.path.join(run_copy, "regenerated", "variations", "shards", "shard-00001.npz")
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorruptOutput, match="shard 1 is missing or unreadable") as caught:
        pipeline.run(config, run_copy, "student")
    assert caught.value.stage == "regenerate" and caught.value.path == shard
    model = os.path.join(run_copy, "teacher", "model")
    for root, _, files in os.walk(model):
        for name in files:
            open(os.path.join(root, name), "wb").close()
    with pytest.raises(CorruptOutput, match="corrupt or truncated") as caught:
        pipeline.run(config, run_copy, "kd_on_original")
    assert caught.value.stage == "teacher"


@pytest.mark.slow
def test_redo_clears_a_stage_and_what_reads_it_and_says_so(run_copy, idx_dir, capsys):
    config = smoke_config(idx_dir)
    assert pipeline.redo_set(config, "teacher") == [
        "teacher",
        "diagnostics",
        "student",
        "ft",
        "nad",
        "anp",
        "kd_on_original",
    ]
    assert pipeline.redo_set(config, "generator") == [
        "generator",
        "regenerate",
        "diagnostics",
        "student",
        "variations_only",
    ]
    before = os.listdir(os.path.join(run_copy, "regenerated", "variations"))
    pipeline.run(config, run_copy, "teacher", redo="teacher")
    out = capsys.readouterr().out
    removed_dirs = ("teacher", "student", "ft", "nad", "anp", "kd_on_original", "learnability")
    for removed in removed_dirs + ("detectability",):
        assert f"redo: removed {os.path.join(run_copy, removed)}" in out, removed
    assert "teacher: training" in out
    for gone in removed_dirs[1:]:
        assert not os.path.exists(os.path.join(run_copy, gone))
    found = results.read(run_copy)
    assert "student" not in found["models"] and "teacher" in found["models"]
    assert "nad" not in found["models"] and "abl" in found["models"]
    assert not any(k.startswith("variations/trigger") for k in found["diagnostics"])
    assert "variations/sampler_images_per_second" in found["diagnostics"]
    # What reads nothing of the teacher is kept: the variations (less the diagnostics' cached
    # samples), the baselines and ABL, which trains from scratch on the poisoned set.
    after = os.listdir(os.path.join(run_copy, "regenerated", "variations"))
    assert set(before) - set(after) == {"test_variations.npz", "clean_twins.npz"}
    for kept in ("variations_only", "clean_reference", "trusted_only", "generator", "abl"):
        assert os.path.exists(os.path.join(run_copy, kept, "done.json")), kept
    # A redo that would leave a requested stage without its inputs is refused before it
    # removes anything.
    with pytest.raises(pipeline.ConfigError, match="student needs teacher"):
        pipeline.run(config, run_copy, "student", redo="teacher")
    assert os.path.exists(os.path.join(run_copy, "teacher", "done.json"))
