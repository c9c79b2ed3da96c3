"""Image datasets in memory, and the train / trusted / test splits of a source.

Every source yields the same thing: uint8 NHWC images, int32 labels and class names, held in
host memory. The datasets this project targets (Fashion-MNIST, CIFAR-10, ImageNette) fit there,
and holding them lets the data order be a pure function of (seed, epoch) on every host.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from jaxclean import sources


class DataError(ValueError):
    """A dataset that cannot be read or split as configured."""


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Images with labels, all in host memory.

    Attributes:
      images: uint8 array [N, H, W, C].
      labels: int32 array [N].
      class_names: one name per class; labels index into it.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(
                f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"{self.images.shape[0]} images but labels of shape {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, indices: np.ndarray) -> ImageDataset:
        return ImageDataset(self.images[indices], self.labels[indices], self.class_names)

    def concatenate(self, other: ImageDataset) -> ImageDataset:
        """This dataset's samples followed by `other`'s (same image shape and classes)."""
        if other.image_shape != self.image_shape:
            raise DataError(
                f"cannot join images of shape {other.image_shape} to images of shape "
                f"{self.image_shape}"
            )
        if other.class_names != self.class_names:
            raise DataError(
                f"cannot join datasets with different classes: {other.class_names} and "
                f"{self.class_names}"
            )
        return ImageDataset(
            np.concatenate([self.images, other.images]),
            np.concatenate([self.labels, other.labels]).astype(self.labels.dtype),
            self.class_names,
        )

    def fingerprint(self) -> str:
        """A hash of the pixels and labels: identifies this exact data in manifests."""
        digest = hashlib.sha256()
        digest.update(str(self.images.shape).encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.ascontiguousarray(self.labels, dtype=np.int32).tobytes())
        return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Splits:
    """The three splits the method uses.

    Attributes:
      train: the set that may be poisoned and that the teacher trains on.
      trusted: a class-balanced subset held out of train; never poisoned, it trains the
        generator that stands in for a web-scale pretrained model.
      test: the evaluation set.
      trusted_indices: where `trusted` came from in the source's training set.
    """

    train: ImageDataset
    trusted: ImageDataset
    test: ImageDataset
    trusted_indices: np.ndarray


# ----------------------------------------------------------------------------- splits


SOURCES = ("idx", "imagefolder", "tfds:NAME")


def check_source_config(data_config) -> None:
    """What can be told wrong about config.data before anything is read."""
    source = data_config.source
    if source not in ("idx", "imagefolder") and not source.startswith("tfds:"):
        raise DataError(f"unknown data source {source!r}: use one of {SOURCES}")
    if source in ("idx", "imagefolder") and not data_config.dir:
        raise DataError(f"data.dir is empty: set --config.data.dir to the {source} directory")
    if source.startswith("tfds:") and data_config.dir and sources.holds_idx_files(data_config.dir):
        raise DataError(
            f"data.dir {data_config.dir!r} holds IDX files, not a tfds data_dir: set "
            "--config.data.dir= (tfds's default) or to where the tfds dataset is prepared"
        )
    for key in ("trusted_size", "image_size", "train_limit", "train_subset", "test_limit"):
        if data_config[key] < 0:
            raise DataError(f"data.{key} {data_config[key]} must be >= 0 (0: off)")


def load_source(data_config) -> dict:
    """Loads {"train", "test"} from the source the config names."""
    check_source_config(data_config)
    source = data_config.source
    image_size = data_config.image_size or None
    names = tuple(data_config.class_names)
    if source == "idx":
        # IDX files carry no class names: the config's are the only ones.
        splits = sources.load_idx_dir(data_config.dir, names)
        if image_size:
            splits = {
                k: ImageDataset(
                    np.stack([sources.resize(x, image_size) for x in v.images]),
                    v.labels,
                    v.class_names,
                )
                for k, v in splits.items()
            }
        return splits
    if source == "imagefolder":
        splits = sources.load_image_folder(data_config.dir, image_size)
        folders = splits["train"].class_names
        if names and names != folders:
            raise DataError(
                f"data.class_names {list(names)[:3]}... are not the class folders of "
                f"{data_config.dir} ({list(folders)[:3]}...): set --config.data.class_names='()' "
                "to use the folders' names"
            )
        return splits
    splits = sources.load_tfds(
        source[len("tfds:") :], data_config.dir or None, image_size, download=data_config.download
    )
    if names:
        splits = {k: _renamed(v, names) for k, v in splits.items()}
    return splits


def _renamed(split: ImageDataset, names: tuple) -> ImageDataset:
    """The same data with readable class names (tfds ImageNette's are WordNet ids), which
    text-prompted generators put in their prompts."""
    if len(names) != split.num_classes:
        raise DataError(
            f"data.class_names has {len(names)} names but the data has {split.num_classes} "
            f"classes ({split.class_names[:3]}...): set --config.data.class_names='()' to use "
            "the source's own"
        )
    return ImageDataset(split.images, split.labels, names)


def balanced_holdout(labels: np.ndarray, size: int, num_classes: int, seed: int) -> np.ndarray:
    """Chooses `size` indices spread evenly over classes, deterministically from `seed`.

    Each class gives size // num_classes samples; the remainder comes one each from the lowest
    class ids. Returns the indices sorted.
    """
    if size < 0 or size >= len(labels):
        raise DataError(f"trusted split size {size} must be in [0, {len(labels)})")
    rng = np.random.default_rng(seed)
    per_class = np.full(num_classes, size // num_classes)
    per_class[: size % num_classes] += 1
    chosen = []
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class[cls]:
            raise DataError(
                f"class {cls} has {len(members)} samples, fewer than the {per_class[cls]} the "
                f"trusted split of {size} needs"
            )
        chosen.append(rng.permutation(members)[: per_class[cls]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def load_splits(data_config, seed: int) -> Splits:
    """Loads the source and carves the trusted split out of its training set.

    Args:
      data_config: config.data (source, dir, trusted_size, optional train_limit, test_limit
        and train_subset).
      seed: chooses the trusted subset.
    """
    source = load_source(data_config)
    full_train, test = source["train"], source["test"]
    if data_config.train_limit:
        full_train = full_train.subset(np.arange(min(data_config.train_limit, len(full_train))))
    if data_config.test_limit:
        test = test.subset(np.arange(min(data_config.test_limit, len(test))))
    trusted_indices = balanced_holdout(
        full_train.labels, data_config.trusted_size, full_train.num_classes, seed
    )
    train_mask = np.ones(len(full_train), bool)
    train_mask[trusted_indices] = False
    train_indices = np.flatnonzero(train_mask)
    if data_config.train_subset:
        # After the trusted split is carved, so a quick run keeps the full run's trusted split
        # (and can adopt a generator trained on it); train_limit cuts before, changing both.
        train_indices = train_indices[: data_config.train_subset]
    return Splits(
        train=full_train.subset(train_indices),
        trusted=full_train.subset(trusted_indices),
        test=test,
        trusted_indices=trusted_indices,
    )
