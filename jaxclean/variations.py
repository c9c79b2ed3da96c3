"""The variations dataset on disk: resumable shards, and the driver that fills them.

Shard s holds the images with indices [s * shard_size, (s + 1) * shard_size). Processes take
shards round-robin and sample them on their own devices: regeneration needs no communication
between processes, and since each image's randomness folds from its index, the union of the
shards is the same dataset whatever the process count. Each shard is written atomically; one
that fails to load (a crash mid-write on a filesystem without atomic rename, a truncated copy)
is detected and redone.

Each shard also records a digest of every source image and label. A run on the same images with
another attack (the clean majority of the images is the same) may reuse the variations of
another run made with the same generator and sampler settings: a row whose source digest
matches is copied, the rest are sampled. Since an image's variation depends only on its
source, label, index and the seed, a copied row is the row this run would have sampled. The
post-processing (`jaxclean.diffusion.postprocess`) is applied to every row written, copied or
sampled, so a source post-processed by a step this run's covers gives the same rows.
"""

from __future__ import annotations

import hashlib
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
    """A variations dataset that is missing or incomplete.

    Attributes:
      path: the shard that is missing or unreadable.
    """

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


def shard_path(directory: str, shard: int) -> str:
    return os.path.join(directory, "shards", f"shard-{shard:05d}.npz")


def num_shards(num_images: int, shard_size: int) -> int:
    return math.ceil(num_images / shard_size)


def shard_indices(shard: int, shard_size: int, num_images: int) -> np.ndarray:
    return np.arange(shard * shard_size, min((shard + 1) * shard_size, num_images))


def source_digests(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A 64-bit digest of each (image, label) row: what a variation is generated from."""
    return np.array(
        [
            int.from_bytes(
                hashlib.blake2b(
                    np.ascontiguousarray(image).tobytes() + int(label).to_bytes(8, "little"),
                    digest_size=8,
                ).digest(),
                "little",
            )
            for image, label in zip(images, labels)
        ],
        dtype=np.uint64,
    )


def read_shard(path: str, expected: np.ndarray, image_shape) -> dict | None:
    """The shard's arrays, or None when it is absent, unreadable or not the expected rows."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("images", "labels", "indices", "source_digests")}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    if not np.array_equal(arrays["indices"], expected):
        return None
    if arrays["images"].shape != (len(expected), *image_shape) or len(arrays["labels"]) != len(
        expected
    ):
        return None
    return arrays


def write_shard(
    path: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, digests: np.ndarray
) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels, indices=indices, source_digests=digests)
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
    postprocess=None,
    reuse_from: str = "",
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
      postprocess: uint8 pixels -> uint8 pixels, applied to every row of a shard before it is
        written (None: none).
      reuse_from: "" or the directory of variations made by the same generator and sampler
        settings, post-processed by a step `postprocess` covers (the caller checks that), with
        the same shard size: rows whose source digest matches are copied from it instead of
        sampled.

    Returns:
      {"images_per_second", "shards_written", "shards_skipped", "images_reused"} for this
      process.
    """
    total = len(dataset)
    shards = range(num_shards(total, shard_size))
    mine = [s for s in shards if s % jax.process_count() == jax.process_index()]
    batch = per_device_batch * mesh.size
    key = jax.random.key(seed)
    written = skipped = generated = reused = 0
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
        digests = source_digests(dataset.images[indices], dataset.labels[indices])
        images, copied = _reusable_rows(reuse_from, shard, indices, digests, dataset.image_shape)
        bar.update(int(copied.sum()))
        todo = indices[~copied]
        if len(todo):
            images[~copied] = sample_rows(
                sampler,
                params,
                dataset.images[todo],
                todo,
                dataset.labels[todo],
                key,
                batch,
                mesh,
                on_batch=bar.update,
            )
        if postprocess is not None:
            images = postprocess(images)
        generated += len(todo)
        reused += int(copied.sum())
        write_shard(path, images, dataset.labels[indices], indices, digests)
        written += 1
        faults.kill_point(description, shard)
    bar.close()
    seconds = time.perf_counter() - started
    sharding.barrier("regenerate")
    return {
        "images_per_second": generated / seconds if generated else float("nan"),
        "shards_written": written,
        "shards_skipped": skipped,
        "images_reused": reused,
    }


def _reusable_rows(reuse_from: str, shard: int, indices, digests, image_shape):
    """(a shard-sized uint8 buffer holding the reusable rows, the mask of those rows)."""
    images = np.zeros((len(indices), *image_shape), np.uint8)
    copied = np.zeros(len(indices), bool)
    if not reuse_from:
        return images, copied
    other = read_shard(shard_path(reuse_from, shard), indices, image_shape)
    if other is None:
        raise VariationsError(
            f"cannot reuse shard {shard} of {reuse_from}: it is missing, unreadable, or holds "
            "other rows (another shard size or image count)"
        )
    copied = other["source_digests"] == digests
    images[copied] = other["images"][copied]
    return images, copied


def load_variations(
    directory: str, num_images: int, shard_size: int, image_shape, class_names
) -> ImageDataset:
    """The whole variations dataset, in index order; every shard must be present and whole."""
    images, labels = [], []
    for shard in range(num_shards(num_images, shard_size)):
        expected = shard_indices(shard, shard_size, num_images)
        path = shard_path(directory, shard)
        arrays = read_shard(path, expected, image_shape)
        if arrays is None:
            raise VariationsError(
                f"variations in {directory} are incomplete: shard {shard} is missing or unreadable",
                path,
            )
        images.append(arrays["images"])
        labels.append(arrays["labels"])
    return ImageDataset(
        np.concatenate(images), np.concatenate(labels).astype(np.int32), tuple(class_names)
    )
