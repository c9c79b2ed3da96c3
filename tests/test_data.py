"""Sources (IDX, ImageFolder, tfds), the trusted split, and the errors for bad data."""

import os

import numpy as np
import pytest
from conftest import synthetic_images, write_idx, write_idx_dataset
from PIL import Image

from configs import common
from jaxclean import data, sources


def test_idx_round_trip_gzip_and_plain(tmp_path):
    images, labels = synthetic_images(30, seed=0)
    write_idx(str(tmp_path / "a.gz"), images)
    write_idx(str(tmp_path / "b"), labels, compress=False)
    np.testing.assert_array_equal(sources.read_idx(str(tmp_path / "a.gz")), images)
    np.testing.assert_array_equal(sources.read_idx(str(tmp_path / "b")), labels)


def test_idx_dir_loads_splits_with_names(tmp_path):
    write_idx_dataset(str(tmp_path), num_train=50, num_test=20)
    splits = sources.load_idx_dir(str(tmp_path), class_names=[f"c{i}" for i in range(10)])
    assert splits["train"].images.shape == (50, 28, 28, 1)
    assert splits["test"].images.dtype == np.uint8
    assert splits["train"].labels.dtype == np.int32
    assert splits["train"].class_names[3] == "c3"


def test_idx_wrong_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(data.DataError, match="bad magic"):
        sources.read_idx(str(path))


def test_idx_truncated(tmp_path):
    images, _ = synthetic_images(10, seed=0)
    write_idx(str(tmp_path / "full"), images, compress=False)
    raw = (tmp_path / "full").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:-100])
    with pytest.raises(data.DataError, match="truncated"):
        sources.read_idx(str(tmp_path / "cut"))


def test_idx_truncated_gzip_stream(tmp_path):
    images, _ = synthetic_images(10, seed=0)
    write_idx(str(tmp_path / "full.gz"), images)
    raw = (tmp_path / "full.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match="cut.gz"):
        sources.read_idx(str(tmp_path / "cut.gz"))


def test_missing_directory_names_the_fix(tmp_path):
    with pytest.raises(data.DataError, match="dataset-fashion-mnist"):
        sources.load_idx_dir(str(tmp_path / "nowhere"))


def test_missing_idx_file(tmp_path):
    write_idx_dataset(str(tmp_path))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte"):
        sources.load_idx_dir(str(tmp_path))


def write_folder(root, split, sizes_by_class):
    for name, sizes in sizes_by_class.items():
        os.makedirs(os.path.join(root, split, name), exist_ok=True)
        for i, (h, w, mode) in enumerate(sizes):
            array = np.full((h, w) if mode == "L" else (h, w, 3), 10 * i, np.uint8)
            Image.fromarray(array, mode=mode).save(os.path.join(root, split, name, f"{i}.png"))


def test_image_folder_loads_sorted_classes(tmp_path):
    for split in ("train", "test"):
        write_folder(tmp_path, split, {"cat": [(8, 8, "RGB")] * 3, "ant": [(8, 8, "RGB")] * 2})
    splits = sources.load_image_folder(str(tmp_path))
    assert splits["train"].class_names == ("ant", "cat")
    assert splits["train"].images.shape == (5, 8, 8, 3)
    assert splits["train"].labels.tolist() == [0, 0, 1, 1, 1]


def test_config_class_names_must_be_the_image_folders_own(tmp_path):
    for split in ("train", "test"):
        write_folder(tmp_path, split, {"n01": [(8, 8, "RGB")] * 2, "n02": [(8, 8, "RGB")]})
    config = common.data_config(source="imagefolder", dir=str(tmp_path), class_names=("n01", "n02"))
    splits = data.load_source(config)
    assert splits["train"].class_names == splits["test"].class_names == ("n01", "n02")
    assert splits["train"].labels.tolist() == [0, 0, 1]
    # The folders are named: other names are refused, with the fix named.
    config.class_names = ("tench", "church")
    with pytest.raises(data.DataError, match=r"not the class folders.*class_names='\(\)'"):
        data.load_source(config)
    config.class_names = ()
    assert data.load_source(config)["train"].class_names == ("n01", "n02")


def test_image_folder_mixed_sizes_refused(tmp_path):
    write_folder(tmp_path, "train", {"a": [(8, 8, "RGB"), (9, 8, "RGB")]})
    with pytest.raises(data.DataError, match="mixed sizes"):
        sources.load_image_folder_split(str(tmp_path / "train"))


def test_image_folder_mixed_channels_refused(tmp_path):
    write_folder(tmp_path, "train", {"a": [(8, 8, "RGB")], "b": [(8, 8, "L")]})
    with pytest.raises(data.DataError, match="channels"):
        sources.load_image_folder_split(str(tmp_path / "train"))


def test_image_folder_resize_makes_sizes_agree(tmp_path):
    write_folder(tmp_path, "train", {"a": [(8, 8, "RGB"), (12, 10, "RGB")]})
    split = sources.load_image_folder_split(str(tmp_path / "train"), image_size=6)
    assert split.images.shape == (2, 6, 6, 3)


def test_unreadable_image_named(tmp_path):
    os.makedirs(tmp_path / "train" / "a")
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(data.DataError, match="broken.png"):
        sources.load_image_folder_split(str(tmp_path / "train"))


def test_tfds_prepared_locally_loads_offline(tmp_path):
    """A dataset prepared here by a tfds builder loads through the `tfds:NAME` source."""
    import tensorflow_datasets as tfds

    class JaxcleanTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        # Tensor, not Image: encoding PNGs would need TensorFlow.
                        "image": tfds.features.Tensor(shape=(6, 6, 1), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(names=["left", "right"]),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(8), "test": self._generate_examples(4)}

        def _generate_examples(self, num):
            for i in range(num):
                yield i, {"image": np.full((6, 6, 1), i, np.uint8), "label": i % 2}

    JaxcleanTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = common.data_config(source="tfds:jaxclean_tiny_images", dir=str(tmp_path))
    splits = data.load_source(config)
    assert splits["train"].class_names == ("left", "right")
    assert splits["train"].images.shape == (8, 6, 6, 1)
    assert sorted(splits["test"].images[:, 0, 0, 0].tolist()) == [0, 1, 2, 3]
    by_value = dict(zip(splits["train"].images[:, 0, 0, 0].tolist(), splits["train"].labels))
    assert all(by_value[v] == v % 2 for v in by_value)
    # Readable names may rename its classes (ImageNette's are WordNet ids), one per class.
    config.class_names = ("west", "east")
    assert data.load_source(config)["test"].class_names == ("west", "east")
    config.class_names = ("west",)
    with pytest.raises(data.DataError, match="1 names but the data has 2 classes"):
        data.load_source(config)


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
    config = common.data_config(source="tfds:mnist", dir=str(tmp_path))
    with pytest.raises(data.DataError, match="not prepared"):
        data.load_source(config)


def test_unknown_source():
    with pytest.raises(data.DataError, match="unknown data source"):
        data.load_source(common.data_config(source="csv", dir="/"))


def test_trusted_split_is_balanced_deterministic_and_disjoint(tmp_path):
    write_idx_dataset(str(tmp_path), num_train=300, num_test=20)
    config = common.data_config(source="idx", dir=str(tmp_path), trusted_size=55)
    splits = data.load_splits(config, seed=1)
    assert len(splits.trusted) == 55 and len(splits.train) == 245
    counts = np.bincount(splits.trusted.labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    again = data.load_splits(config, seed=1)
    np.testing.assert_array_equal(splits.trusted_indices, again.trusted_indices)
    other = data.load_splits(config, seed=2)
    assert not np.array_equal(splits.trusted_indices, other.trusted_indices)
    full = sources.load_idx_dir(str(tmp_path))["train"]
    kept = np.setdiff1d(np.arange(300), splits.trusted_indices)
    np.testing.assert_array_equal(splits.train.images, full.images[kept])


def test_train_subset_keeps_the_full_runs_trusted_split(tmp_path):
    """train_subset cuts train after trusted is carved, so a quick run can adopt the generator
    of the full run; train_limit cuts the source first and so changes the trusted split."""
    write_idx_dataset(str(tmp_path), num_train=300, num_test=20)
    config = common.data_config(source="idx", dir=str(tmp_path), trusted_size=50)
    full = data.load_splits(config, seed=0)
    config.train_subset = 100
    subset = data.load_splits(config, seed=0)
    assert subset.trusted.fingerprint() == full.trusted.fingerprint()
    assert len(subset.train) == 100
    np.testing.assert_array_equal(subset.train.images, full.train.images[:100])
    config.train_subset = 0
    config.train_limit = 150
    assert data.load_splits(config, seed=0).trusted.fingerprint() != full.trusted.fingerprint()
    config.train_subset = -1
    with pytest.raises(data.DataError, match="train_subset"):
        data.load_splits(config, seed=0)


def test_trusted_split_too_large():
    labels = np.arange(20) % 10
    with pytest.raises(data.DataError, match="trusted split size"):
        data.balanced_holdout(labels, 20, 10, 0)
    with pytest.raises(data.DataError, match="fewer than"):
        data.balanced_holdout(np.zeros(20, int), 5, 2, 0)


def test_concatenate_keeps_order_and_refuses_mismatches():
    names = ("a", "b")
    first = data.ImageDataset(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1], np.int32), names)
    second = data.ImageDataset(
        np.ones((3, 4, 4, 1), np.uint8), np.array([1, 1, 0], np.int32), names
    )
    joined = first.concatenate(second)
    assert len(joined) == 5 and joined.labels.dtype == np.int32
    np.testing.assert_array_equal(joined.images[:, 0, 0, 0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(joined.labels, [0, 1, 1, 1, 0])
    other_size = data.ImageDataset(np.zeros((1, 5, 5, 1), np.uint8), np.zeros(1, np.int32), names)
    with pytest.raises(data.DataError, match=r"shape \(5, 5, 1\)"):
        first.concatenate(other_size)
    other_classes = data.ImageDataset(
        np.zeros((1, 4, 4, 1), np.uint8), np.zeros(1, np.int32), ("x", "y")
    )
    with pytest.raises(data.DataError, match="different classes"):
        first.concatenate(other_classes)
