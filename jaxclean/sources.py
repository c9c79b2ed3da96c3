"""Where images come from: MNIST-style IDX files, an ImageFolder tree, or TensorFlow Datasets.

Each reader returns {"train": ImageDataset, "test": ImageDataset} of uint8 NHWC images and
int32 labels (`jaxclean.data`), or a DataError that names the file and the fix.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from jaxclean import data

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte), the number of dims.
_IDX_UBYTE = 0x08


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
                raise data.DataError(f"{path}: not an IDX file (bad magic number {header.hex()!r})")
            if header[2] != _IDX_UBYTE:
                raise data.DataError(
                    f"{path}: IDX type code {header[2]:#04x}, expected 0x08 (ubyte)"
                )
            ndim = header[3]
            dims_bytes = f.read(4 * ndim)
            if len(dims_bytes) < 4 * ndim:
                raise data.DataError(f"{path}: truncated IDX header")
            shape = struct.unpack(">" + "I" * ndim, dims_bytes)
            expected = int(np.prod(shape))
            payload = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise data.DataError(
            f"{path}: cannot read IDX file ({e}): the file is corrupt; fetch it again"
        ) from None
    if len(payload) != expected:
        raise data.DataError(
            f"{path}: truncated or oversized IDX file: header says {shape} = {expected} bytes, "
            f"found {len(payload)}"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def holds_idx_files(directory: str) -> bool:
    """Whether `directory` holds the IDX training images (gzipped or not)."""
    stem = os.path.join(directory, IDX_FILES["train"][0])
    return os.path.isfile(stem) or os.path.isfile(stem + ".gz")


def _find_idx(directory: str, stem: str) -> str:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise data.DataError(f"{directory}: missing IDX file {stem}[.gz]")


def load_idx_dir(directory: str, class_names: Sequence[str] | None = None) -> dict:
    """Loads train and test splits from a directory of MNIST-style IDX files.

    Args:
      directory: holds train-images-idx3-ubyte[.gz] and the three other files.
      class_names: names for the labels; defaults to their numbers.

    Returns:
      {"train": ImageDataset, "test": ImageDataset}.
    """
    if not os.path.isdir(directory):
        raise data.DataError(
            f"dataset directory {directory!r} does not exist (for Fashion-MNIST install the "
            "Debian package dataset-fashion-mnist, or pass --config.data.dir)"
        )
    raw = {}
    for split, (image_stem, label_stem) in IDX_FILES.items():
        images = read_idx(_find_idx(directory, image_stem))
        labels = read_idx(_find_idx(directory, label_stem))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise data.DataError(
                f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match"
            )
        raw[split] = (images[..., None], labels.astype(np.int32))
    num_classes = int(max(raw["train"][1].max(), raw["test"][1].max())) + 1
    names = _class_names(class_names, num_classes)
    return {
        split: data.ImageDataset(images, labels, names) for split, (images, labels) in raw.items()
    }


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> tuple[str, ...]:
    if not class_names:
        return tuple(str(i) for i in range(num_classes))
    if len(class_names) != num_classes:
        raise data.DataError(
            f"data.class_names has {len(class_names)} names but the IDX files have "
            f"{num_classes} classes: set --config.data.class_names='()' to number them"
        )
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
        raise data.DataError(f"{path}: cannot read image: {e}") from e
    return array[..., None] if array.ndim == 2 else array


def resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if image.shape[0] == size and image.shape[1] == size:
        return image
    mode = "L" if image.shape[-1] == 1 else "RGB"
    pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode)
    out = np.asarray(pil.resize((size, size), Image.BICUBIC), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def load_image_folder_split(root: str, image_size: int | None = None) -> data.ImageDataset:
    """Loads one split laid out as root/<class name>/<image file>.

    Classes are the sorted subfolder names. All images must share height, width and channels
    unless `image_size` is given, in which case each is resized to a square of that size.
    """
    if not os.path.isdir(root):
        raise data.DataError(f"image folder {root!r} does not exist")
    class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not class_names:
        raise data.DataError(f"image folder {root!r} has no class subfolders")
    images, labels, first = [], [], None
    for label, name in enumerate(class_names):
        class_dir = os.path.join(root, name)
        for filename in sorted(os.listdir(class_dir)):
            if not filename.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(class_dir, filename)
            image = _read_image(path)
            if image_size:
                image = resize(image, image_size)
            if first is None:
                first = (path, image.shape)
            elif image.shape != first[1]:
                raise data.DataError(
                    f"images of mixed sizes or channels: {path} is {image.shape} but "
                    f"{first[0]} is {first[1]} (set --config.data.image_size to resize)"
                )
            images.append(image)
            labels.append(label)
    if not images:
        raise data.DataError(f"image folder {root!r} has no {'/'.join(IMAGE_SUFFIXES)} images")
    return data.ImageDataset(np.stack(images), np.asarray(labels, np.int32), tuple(class_names))


def load_image_folder(root: str, image_size: int | None = None) -> dict:
    """Loads root/train/<class>/... and root/test/<class>/...; both must name the same classes."""
    splits = {s: load_image_folder_split(os.path.join(root, s), image_size) for s in IDX_FILES}
    if splits["train"].class_names != splits["test"].class_names:
        raise data.DataError(
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
        # Its message lists the whole catalogue; only its suggestion is worth a line.
        suggestion = re.search(r"Did you mean:?\s*(?:\S+\s*->\s*)?([\w/.:-]+)", str(e))
        hint = f"; did you mean {suggestion.group(1)}?" if suggestion else ""
        where = data_dir or "tfds's default data_dir"
        raise data.DataError(
            f"tfds dataset {name!r} is not in the catalogue or under {where}{hint}"
        ) from None
    if download:
        builder.download_and_prepare()
    if not os.path.isdir(os.fspath(builder.data_dir)) or not builder.info.splits:
        raise data.DataError(
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
            raise data.DataError(
                f"tfds {name}: images of mixed sizes {sorted(shapes)[:3]}; set image_size"
            )
        splits[split] = data.ImageDataset(np.stack(images), labels, class_names)
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
        raise data.DataError(
            f"reading the tfrecord dataset {builder.name} needs TensorFlow: "
            "pip install '.[prepare]', or prepare it with file_format=array_record"
        ) from e


def _tfds_image(image, image_size: int | None) -> np.ndarray:
    image = np.asarray(image, dtype=np.uint8)
    image = image[..., None] if image.ndim == 2 else image
    return resize(image, image_size) if image_size else image
