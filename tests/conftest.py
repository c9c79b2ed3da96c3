"""Shared fixtures: small synthetic datasets written in each source's format, a runner for
launch.py in a subprocess (the way users run it, and the only way to vary the device count),
and one smoke run of every stage that the stage tests read or copy."""

from __future__ import annotations

import fcntl
import gzip
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# One XLA compilation cache for the session, this process and every launch.py it starts: the
# stages of a smoke run compile the same few programs over and over, and so do the tests.
# Set before JAX is imported; cached programs are the programs compiled, so results are the
# same bit for bit.
_XLA_CACHE = tempfile.mkdtemp(prefix="jaxclean-xla-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

NUM_CLASSES = 10


def pytest_sessionfinish(session, exitstatus):
    del session, exitstatus
    if "PYTEST_XDIST_WORKER" not in os.environ:  # The controller: after every worker is done.
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


# The file whose first test makes the smoke run, and the fixtures that read it.
SMOKE_MAKER = "test_pipeline.py"
SMOKE_FIXTURES = {"smoke_run", "run_copy"}


def pytest_collection_modifyitems(session, config, items):
    """The smoke run's maker first, the files that read it last: with `-n 2 --dist loadfile`
    one worker makes the run while the other works through files that need none of it."""
    del session, config
    reads_smoke = {item.path.name for item in items if SMOKE_FIXTURES & set(item.fixturenames)}

    def rank(item):
        name = item.path.name
        return 0 if name == SMOKE_MAKER else 2 if name in reads_smoke else 1

    items.sort(key=rank)  # Stable: each file's tests keep their order.


def synthetic_images(num: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Images a small network learns in a few steps: class k lights up horizontal band k."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num) % NUM_CLASSES
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(num, size, size), dtype=np.uint8)
    band = size // NUM_CLASSES
    for i, label in enumerate(labels):
        images[i, label * band : (label + 1) * band, 2:-6] = 220
    return images, labels.astype(np.uint8)


def write_idx(path: str, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_idx_dataset(directory: str, num_train: int = 300, num_test: int = 100) -> str:
    os.makedirs(directory, exist_ok=True)
    train_x, train_y = synthetic_images(num_train, seed=0)
    test_x, test_y = synthetic_images(num_test, seed=1)
    write_idx(os.path.join(directory, "train-images-idx3-ubyte.gz"), train_x)
    write_idx(os.path.join(directory, "train-labels-idx1-ubyte.gz"), train_y)
    write_idx(os.path.join(directory, "t10k-images-idx3-ubyte.gz"), test_x)
    write_idx(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"), test_y)
    return directory


def shared_once(tmp_path_factory, name: str, make) -> str:
    """The directory `name`, made once per test run by make(directory) and shared by every
    pytest-xdist worker: the first to ask makes it under a file lock, the others wait and
    read it. Its path is the same in every worker, so records that name it agree."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # The run's base directory, above each worker's own.
    directory = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / ".made").exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            make(str(directory))
            (directory / ".made").touch()
    return str(directory)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> str:
    return shared_once(tmp_path_factory, "idx", write_idx_dataset)


def run_launch(args: list[str], devices: int = 1, env: dict | None = None, timeout: int = 1800):
    """Runs launch.py in a fresh interpreter with `devices` forced CPU devices.

    The timeout only catches a hung run.
    """
    full_env = dict(os.environ)
    full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    full_env["JAX_PLATFORMS"] = "cpu"
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "launch.py"), *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def smoke_args(workdir: str, data_dir: str, *extra: str) -> list[str]:
    return [
        "--config",
        os.path.join(REPO, "configs", "smoke.py"),
        "--workdir",
        workdir,
        f"--config.data.dir={data_dir}",
        *extra,
    ]


def smoke_config(data_dir: str, **teacher):
    """configs/smoke.py on the IDX files in `data_dir`, with teacher fields changed."""
    from configs import smoke

    config = smoke.get_config()
    config.data.dir = data_dir
    config.teacher.update(teacher)
    return config


def blended_reusing(data_dir: str, workdir: str, reuse_from: str = ""):
    """The smoke config under a Blended attack, adopting `workdir`'s generator and reusing
    the variations in `reuse_from` (when given): another attack on the same data."""
    config = smoke_config(data_dir)
    config.attack.name = "blended"
    config.attack.trigger = dict(pattern="noise", ratio=0.2, noise_seed=42)
    config.generator.pretrained = os.path.join(workdir, "generator")
    config.regenerate.reuse_from = reuse_from
    return config


@pytest.fixture(scope="session")
def smoke_run(idx_dir, tmp_path_factory):
    """Every stage of the smoke config, once per test run (shared by the xdist workers),
    through launch.py; tests copy what they change. (workdir, its launch.py output)."""

    def make(directory):
        result = run_launch(smoke_args(os.path.join(directory, "run"), idx_dir))
        for name in ("stdout", "stderr"):
            with open(os.path.join(directory, name), "w") as f:
                f.write(getattr(result, name))
        with open(os.path.join(directory, "returncode"), "w") as f:
            f.write(str(result.returncode))

    directory = shared_once(tmp_path_factory, "smoke", make)
    outputs = {}
    for name in ("stdout", "stderr", "returncode"):
        with open(os.path.join(directory, name)) as f:
            outputs[name] = f.read()
    workdir = os.path.join(directory, "run")
    result = subprocess.CompletedProcess(
        ["launch.py"], int(outputs["returncode"]), outputs["stdout"], outputs["stderr"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


@pytest.fixture
def run_copy(smoke_run, tmp_path) -> str:
    """A private copy of the smoke run's workdir, for a test that changes what is in it."""
    copy = str(tmp_path / "copy")
    shutil.copytree(smoke_run[0], copy)
    return copy
