"""The regeneration driver: a variation of every training image, in resumable shards.

Shard s holds the images with indices [s * shard_size, (s + 1) * shard_size). Processes take
shards round-robin and sample them on their own devices: regeneration needs no communication
between processes, and since each image's randomness folds from its index, the union of the
shards is the same dataset whatever the process count. Each shard is written atomically; one
that fails to load (a crash mid-write on a filesystem without atomic rename, a truncated copy)
is detected and redone.
"""

from __future__ import annotations

import io
import math
import os
import time
import zipfile

import jax
import numpy as np

from jaxclean import faults, sharding
from jaxclean.artifacts import atomic_write_bytes
from jaxclean.data import ImageDataset
from jaxclean.metrics import progress


class VariationsError(RuntimeError):
    """A variations dataset that is missing or incomplete."""


def shard_path(directory: str, shard: int) -> str:
    return os.path.join(directory, "shards", f"shard-{shard:05d}.npz")


def num_shards(num_images: int, shard_size: int) -> int:
    return math.ceil(num_images / shard_size)


def shard_indices(shard: int, shard_size: int, num_images: int) -> np.ndarray:
    return np.arange(shard * shard_size, min((shard + 1) * shard_size, num_images))


def read_shard(path: str, expected: np.ndarray, image_shape) -> dict | None:
    """The shard's arrays, or None when it is absent, unreadable or not the expected rows."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("images", "labels", "indices")}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    if not np.array_equal(arrays["indices"], expected):
        return None
    if arrays["images"].shape != (len(expected), *image_shape) or len(arrays["labels"]) != len(
        expected
    ):
        return None
    return arrays


def write_shard(path: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels, indices=indices)
    atomic_write_bytes(path, buffer.getvalue())


def sample_rows(
    sampler, params, images, indices, labels, key, batch: int, mesh, on_batch=None
) -> np.ndarray:
    """Variations of `images` (whose dataset indices are `indices`), `batch` rows per call.

    The last call is padded with copies of the last row, so one compiled program serves all.
    """
    outputs = []
    for start in range(0, len(indices), batch):
        rows = slice(start, start + batch)
        valid = len(indices[rows])

        def padded(array, valid=valid):
            return np.concatenate([array, np.repeat(array[-1:], batch - valid, 0)])

        # Placed explicitly: with several processes, jit takes no host arrays for a mesh.
        on_mesh = jax.device_put(
            (
                padded(images[rows]),
                padded(indices[rows]).astype(np.int32),
                padded(labels[rows]).astype(np.int32),
            ),
            sharding.data_sharding(mesh),
        )
        outputs.append(np.asarray(sampler(params, *on_mesh, key))[:valid])
        if on_batch is not None:
            on_batch(valid)
    return np.concatenate(outputs)


def regenerate(
    dataset: ImageDataset,
    sampler,
    params,
    directory: str,
    *,
    shard_size: int,
    per_device_batch: int,
    seed: int,
    mesh,
    description: str = "regenerate",
) -> dict:
    """Writes a variation of every image of `dataset` under directory/shards/.

    Args:
      dataset: the images to vary; their labels are kept as they are.
      sampler: jitted (params, images, indices, labels, key) -> uint8 images, over `mesh`.
      params: the sampler's parameters, already placed (replicated) on `mesh`.
      directory: the stage directory.
      shard_size: images per shard file.
      per_device_batch: rows each device samples per call.
      seed: the key every image's randomness folds from.
      mesh: this process's devices.

    Returns:
      {"images_per_second", "shards_written", "shards_skipped"} for this process.
    """
    total = len(dataset)
    shards = range(num_shards(total, shard_size))
    mine = [s for s in shards if s % jax.process_count() == jax.process_index()]
    batch = per_device_batch * mesh.size
    key = jax.random.key(seed)
    written = skipped = generated = 0
    started = time.perf_counter()
    bar = progress(
        total=sum(len(shard_indices(s, shard_size, total)) for s in mine),
        desc=description,
        unit="img",
    )
    for shard in mine:
        indices = shard_indices(shard, shard_size, total)
        path = shard_path(directory, shard)
        if read_shard(path, indices, dataset.image_shape) is not None:
            skipped += 1
            bar.update(len(indices))
            continue
        if os.path.exists(path):
            print(
                f"{description}: shard {shard} is unreadable or incomplete; redoing it", flush=True
            )
        images = sample_rows(
            sampler,
            params,
            dataset.images[indices],
            indices,
            dataset.labels[indices],
            key,
            batch,
            mesh,
            on_batch=bar.update,
        )
        generated += len(indices)
        write_shard(path, images, dataset.labels[indices], indices)
        written += 1
        faults.kill_point(description, shard)
    bar.close()
    seconds = time.perf_counter() - started
    sharding.barrier("regenerate")
    return {
        "images_per_second": generated / seconds if generated else float("nan"),
        "shards_written": written,
        "shards_skipped": skipped,
    }


def load_variations(
    directory: str, num_images: int, shard_size: int, image_shape, class_names
) -> ImageDataset:
    """The whole variations dataset, in index order; every shard must be present and whole."""
    images, labels = [], []
    for shard in range(num_shards(num_images, shard_size)):
        expected = shard_indices(shard, shard_size, num_images)
        arrays = read_shard(shard_path(directory, shard), expected, image_shape)
        if arrays is None:
            raise VariationsError(
                f"variations in {directory} are incomplete: shard {shard} is missing or "
                "unreadable. Run --stages=regenerate to finish them."
            )
        images.append(arrays["images"])
        labels.append(arrays["labels"])
    return ImageDataset(
        np.concatenate(images), np.concatenate(labels).astype(np.int32), tuple(class_names)
    )
