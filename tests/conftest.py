"""Shared fixtures: small synthetic datasets written in each source's format, and a runner for
launch.py in a subprocess (the way users run it, and the only way to vary the device count)."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

NUM_CLASSES = 10


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


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> str:
    return write_idx_dataset(str(tmp_path_factory.mktemp("idx")))


def run_launch(args: list[str], devices: int = 1, env: dict | None = None, timeout: int = 1800):
    """Runs launch.py in a fresh interpreter with `devices` forced CPU devices.

    The timeout only catches a hung run: the smoke run of every stage takes about 10 minutes
    on 2 free cores, and ran past 600 s whenever an experiment shared them.
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
