"""The variations dataset and its driver: identical output across devices, processes, batches
and crashes; what may be reused from another run."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from jaxclean import variations

WORKER = os.path.join(REPO, "tests", "regen_worker.py")
NUM_IMAGES, SHARD_SIZE = 60, 16


def start_worker(out, devices=1, env=None, **flags):
    full_env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        **(env or {}),
    )
    args = [
        sys.executable,
        WORKER,
        "--out",
        str(out),
        "--num_images",
        str(NUM_IMAGES),
        "--shard_size",
        str(SHARD_SIZE),
    ]
    args += [f"--{k}={v}" for k, v in flags.items()]
    return subprocess.Popen(
        args, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_worker(out, devices=1, env=None, **flags):
    process = start_worker(out, devices, env, **flags)
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr


def read_all(out) -> np.ndarray:
    dataset = variations.load_variations(
        str(out), NUM_IMAGES, SHARD_SIZE, (28, 28, 1), "0123456789"
    )
    return dataset.images


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, one device, 4 images per device per call."""
    out = tmp_path_factory.mktemp("reference")
    code, stdout, stderr = run_worker(out, devices=1, per_device_batch=4)
    assert code == 0, stderr[-3000:]
    images = read_all(out)
    assert images.std() > 10 and not np.array_equal(images[0], images[1])  # Not trivial.
    return out, images


@pytest.mark.slow
def test_bit_identical_on_one_and_four_devices(reference, tmp_path):
    code, stdout, stderr = run_worker(tmp_path, devices=4, per_device_batch=4)
    assert code == 0, stderr[-3000:]
    assert "local=4" in stdout
    np.testing.assert_array_equal(read_all(tmp_path), reference[1])


@pytest.mark.slow
def test_close_across_batch_sizes(reference, tmp_path):
    code, _, stderr = run_worker(tmp_path, devices=1, per_device_batch=12)
    assert code == 0, stderr[-3000:]
    diff = np.abs(read_all(tmp_path).astype(int) - reference[1].astype(int))
    # Other batch shapes may round differently in the last float bit, so a pixel can land
    # one uint8 step away; nothing more.
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_two_devices_write_the_same_dataset(reference, tmp_path):
    coordinator = f"localhost:{free_port()}"
    workers = [
        start_worker(
            tmp_path,
            devices=2,
            per_device_batch=4,
            coordinator=coordinator,
            num_processes=2,
            process_id=i,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
        assert "devices=4 local=2" in stdout
    np.testing.assert_array_equal(read_all(tmp_path), reference[1])


@pytest.mark.slow
def test_kill_then_rerun_gives_the_identical_dataset(reference, tmp_path):
    code, _, _ = run_worker(tmp_path, env={"JAXCLEAN_KILL_AT": "regenerate:1"})
    assert code == -9
    done = sorted(os.listdir(tmp_path / "shards"))
    assert done == ["shard-00000.npz", "shard-00001.npz"]
    with pytest.raises(variations.VariationsError, match="shard 2 is missing"):
        read_all(tmp_path)
    code, stdout, stderr = run_worker(tmp_path)
    assert code == 0, stderr[-3000:]
    assert "'shards_skipped': 2" in stdout
    np.testing.assert_array_equal(read_all(tmp_path), reference[1])


@pytest.mark.slow
def test_truncated_shard_is_detected_and_redone(reference, tmp_path):
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    shard = tmp_path / "shards" / "shard-00002.npz"
    shard.write_bytes(shard.read_bytes()[:500])
    with pytest.raises(variations.VariationsError, match="shard 2"):
        read_all(tmp_path)
    code, stdout, stderr = run_worker(tmp_path)
    assert code == 0, stderr[-3000:]
    assert "shard 2 is unreadable" in stdout + stderr
    assert "'shards_written': 1" in stdout
    np.testing.assert_array_equal(read_all(tmp_path), reference[1])


def test_reuse_copies_only_rows_whose_source_and_label_match(tmp_path):
    images = np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28, 1)
    labels, indices = np.array([0, 1, 2, 3]), np.arange(4)
    digests = variations.source_digests(images, labels)
    path = variations.shard_path(str(tmp_path), 0)
    variations.write_shard(path, images, labels, indices, digests)
    other_label = variations.source_digests(images, np.array([0, 1, 2, 4]))
    reused, copied = variations._reusable_rows(str(tmp_path), 0, indices, other_label, (28, 28, 1))
    np.testing.assert_array_equal(copied, [True, True, True, False])  # The label counts too.
    np.testing.assert_array_equal(reused[:3], images[:3])
    # A shard without digests cannot say which rows match: it is no shard of this layout.
    np.savez(path, images=images, labels=labels, indices=indices)
    assert variations.read_shard(path, indices, (28, 28, 1)) is None
    with pytest.raises(variations.VariationsError, match="missing, unreadable"):
        variations._reusable_rows(str(tmp_path), 0, indices, digests, (28, 28, 1))
