"""Image datasets: sources (IDX, ImageFolder, tfds) and the train / trusted / test splits.

Every source yields the same thing: uint8 NHWC images, int32 labels and class names, held in
host memory. The datasets this project targets (Fashion-MNIST, CIFAR-10, ImageNette) fit there,
and holding them lets the data order be a pure function of (seed, epoch) on every host.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import struct
from collections.abc import Sequence

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte), the number of dims.
_IDX_UBYTE = 0x08


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


# ----------------------------------------------------------------------------- IDX


def _open_maybe_gzip(path: str):
    with open(path, "rb") as probe:
        is_gzip = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if is_gzip else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (optionally gzipped) of unsigned bytes.

    Args:
      path: the file.

    Returns:
      A uint8 array with the file's shape.

    Raises:
      DataError: unreadable file, wrong magic number, or fewer bytes than the header promises.
    """
    try:
        with _open_maybe_gzip(path) as f:
            header = f.read(4)
            if len(header) < 4 or header[0] != 0 or header[1] != 0:
                raise DataError(f"{path}: not an IDX file (bad magic number {header.hex()!r})")
            if header[2] != _IDX_UBYTE:
                raise DataError(f"{path}: IDX type code {header[2]:#04x}, expected 0x08 (ubyte)")
            ndim = header[3]
            dims_bytes = f.read(4 * ndim)
            if len(dims_bytes) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header")
            shape = struct.unpack(">" + "I" * ndim, dims_bytes)
            expected = int(np.prod(shape))
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file: {e}") from e
    if len(data) != expected:
        raise DataError(
            f"{path}: truncated or oversized IDX file: header says {shape} = {expected} bytes, "
            f"found {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _find_idx(directory: str, stem: str) -> str:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise DataError(f"{directory}: missing IDX file {stem}[.gz]")


def load_idx_dir(directory: str, class_names: Sequence[str] | None = None) -> dict:
    """Loads train and test splits from a directory of MNIST-style IDX files.

    Args:
      directory: holds train-images-idx3-ubyte[.gz] and the three other files.
      class_names: names for the labels; defaults to their numbers.

    Returns:
      {"train": ImageDataset, "test": ImageDataset}.
    """
    if not os.path.isdir(directory):
        raise DataError(
            f"dataset directory {directory!r} does not exist (for Fashion-MNIST install the "
            "Debian package dataset-fashion-mnist, or pass --config.data.dir)"
        )
    raw = {}
    for split, (image_stem, label_stem) in IDX_FILES.items():
        images = read_idx(_find_idx(directory, image_stem))
        labels = read_idx(_find_idx(directory, label_stem))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match"
            )
        raw[split] = (images[..., None], labels.astype(np.int32))
    num_classes = int(max(raw["train"][1].max(), raw["test"][1].max())) + 1
    names = _class_names(class_names, num_classes)
    return {split: ImageDataset(images, labels, names) for split, (images, labels) in raw.items()}


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> tuple[str, ...]:
    if not class_names:
        return tuple(str(i) for i in range(num_classes))
    if len(class_names) < num_classes:
        raise DataError(f"{len(class_names)} class names for {num_classes} classes")
    return tuple(class_names)


# ----------------------------------------------------------------------------- ImageFolder


def _read_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read image: {e}") from e
    return array[..., None] if array.ndim == 2 else array


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if image.shape[0] == size and image.shape[1] == size:
        return image
    mode = "L" if image.shape[-1] == 1 else "RGB"
    pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode)
    out = np.asarray(pil.resize((size, size), Image.BICUBIC), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def load_image_folder_split(root: str, image_size: int | None = None) -> ImageDataset:
    """Loads one split laid out as root/<class name>/<image file>.

    Classes are the sorted subfolder names. All images must share height, width and channels
    unless `image_size` is given, in which case each is resized to a square of that size.
    """
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist")
    class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not class_names:
        raise DataError(f"image folder {root!r} has no class subfolders")
    images, labels, first = [], [], None
    for label, name in enumerate(class_names):
        class_dir = os.path.join(root, name)
        for filename in sorted(os.listdir(class_dir)):
            if not filename.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(class_dir, filename)
            image = _read_image(path)
            if image_size:
                image = _resize(image, image_size)
            if first is None:
                first = (path, image.shape)
            elif image.shape != first[1]:
                raise DataError(
                    f"images of mixed sizes or channels: {path} is {image.shape} but "
                    f"{first[0]} is {first[1]} (set --config.data.image_size to resize)"
                )
            images.append(image)
            labels.append(label)
    if not images:
        raise DataError(f"image folder {root!r} has no {'/'.join(IMAGE_SUFFIXES)} images")
    return ImageDataset(np.stack(images), np.asarray(labels, np.int32), tuple(class_names))


def load_image_folder(root: str, image_size: int | None = None) -> dict:
    """Loads root/train/<class>/... and root/test/<class>/...; both must name the same classes."""
    splits = {s: load_image_folder_split(os.path.join(root, s), image_size) for s in IDX_FILES}
    if splits["train"].class_names != splits["test"].class_names:
        raise DataError(
            f"{root}: train classes {splits['train'].class_names} differ from test classes "
            f"{splits['test'].class_names}"
        )
    return splits


# ----------------------------------------------------------------------------- tfds


def load_tfds(name: str, data_dir: str | None, image_size: int | None = None, download=False):
    """Loads train and test splits of a TensorFlow Datasets dataset as arrays.

    Offline, the dataset must already be prepared under `data_dir`. Datasets prepared in the
    array_record format are read without TensorFlow; tfrecord ones need the [prepare] extra.

    Args:
      name: a tfds catalog name such as "fashion_mnist" or "imagenette/320px-v2", or the name
        of a dataset prepared in `data_dir` by a builder outside the catalog.
      data_dir: where prepared datasets live (tfds's default when None).
      image_size: resize every image to this square size (None: keep).
      download: prepare the dataset first if needed (network and TensorFlow required).
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for unknown names.
        raise DataError(
            f"tfds dataset {name!r} not found in catalog or under {data_dir}: {e}"
        ) from e
    if download:
        builder.download_and_prepare()
    if not os.path.isdir(os.fspath(builder.data_dir)) or not builder.info.splits:
        raise DataError(
            f"tfds dataset {name!r} is not prepared under {data_dir!r}; prepare it once with "
            "network access (`pip install '.[prepare]'`, then `tfds build` or "
            "--config.data.download=True)"
        )
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    class_names = tuple(builder.info.features[label_key].names)
    splits = {}
    for split in IDX_FILES:
        if split not in builder.info.splits:
            # ImageNette and others call their test split "validation".
            split_name = "validation"
        else:
            split_name = split
        examples = _tfds_examples(builder, split_name)
        images = [_tfds_image(e[image_key], image_size) for e in examples]
        labels = np.asarray([int(e[label_key]) for e in examples], np.int32)
        shapes = {img.shape for img in images}
        if len(shapes) > 1:
            raise DataError(
                f"tfds {name}: images of mixed sizes {sorted(shapes)[:3]}; set image_size"
            )
        splits[split] = ImageDataset(np.stack(images), labels, class_names)
    return splits


def _tfds_examples(builder, split: str):
    file_format = str(getattr(builder.info, "file_format", "")).lower()
    if "array_record" in file_format:
        source = builder.as_data_source(split=split)
        return [source[i] for i in range(len(source))]
    try:
        import tensorflow_datasets as tfds

        return list(tfds.as_numpy(builder.as_dataset(split=split)))
    except ImportError as e:
        raise DataError(
            f"reading the tfrecord dataset {builder.name} needs TensorFlow: "
            "pip install '.[prepare]', or prepare it with file_format=array_record"
        ) from e


def _tfds_image(image, image_size: int | None) -> np.ndarray:
    image = np.asarray(image, dtype=np.uint8)
    image = image[..., None] if image.ndim == 2 else image
    return _resize(image, image_size) if image_size else image


# ----------------------------------------------------------------------------- splits


def load_source(data_config) -> dict:
    """Loads {"train", "test"} from the source the config names."""
    source = data_config.source
    image_size = data_config.get("image_size") or None
    if source == "idx":
        splits = load_idx_dir(data_config.dir, data_config.get("class_names"))
        if image_size:
            splits = {
                k: ImageDataset(
                    np.stack([_resize(x, image_size) for x in v.images]), v.labels, v.class_names
                )
                for k, v in splits.items()
            }
    elif source == "imagefolder":
        splits = load_image_folder(data_config.dir, image_size)
    elif source.startswith("tfds:"):
        splits = load_tfds(
            source[len("tfds:") :],
            data_config.dir or None,
            image_size,
            download=data_config.get("download", False),
        )
    else:
        raise DataError(f"unknown data source {source!r}: use 'idx', 'imagefolder' or 'tfds:NAME'")
    names = data_config.get("class_names")
    if names and source != "idx":  # IDX files carry no names: load_idx_dir took them above.
        splits = {k: _renamed(v, tuple(names)) for k, v in splits.items()}
    return splits


def _renamed(split: ImageDataset, names: tuple) -> ImageDataset:
    """The same data with readable class names (tfds ImageNette's are WordNet ids), which
    text-prompted generators put in their prompts."""
    if len(names) != split.num_classes:
        raise DataError(
            f"data.class_names has {len(names)} names but the data has {split.num_classes} "
            f"classes ({split.class_names[:3]}...)"
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
    if data_config.get("train_limit"):
        full_train = full_train.subset(np.arange(min(data_config.train_limit, len(full_train))))
    if data_config.get("test_limit"):
        test = test.subset(np.arange(min(data_config.test_limit, len(test))))
    trusted_indices = balanced_holdout(
        full_train.labels, data_config.trusted_size, full_train.num_classes, seed
    )
    train_mask = np.ones(len(full_train), bool)
    train_mask[trusted_indices] = False
    train_indices = np.flatnonzero(train_mask)
    if data_config.get("train_subset", 0) < 0:
        raise DataError(f"data.train_subset {data_config.train_subset} must be >= 0 (0: all)")
    if data_config.get("train_subset"):
        # After the trusted split is carved, so a quick run keeps the full run's trusted split
        # (and can adopt a generator trained on it); train_limit cuts before, changing both.
        train_indices = train_indices[: data_config.train_subset]
    return Splits(
        train=full_train.subset(train_indices),
        trusted=full_train.subset(trusted_indices),
        test=test,
        trusted_indices=trusted_indices,
    )
