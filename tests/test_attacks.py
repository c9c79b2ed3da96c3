"""The poison plan (count, draw, labels, scope), the triggered test sets, BadNets and Blended
against hand-computed pixels and against the official code's semantics."""

import math

import numpy as np
import pytest

from configs import common
from jaxclean import attacks
from jaxclean.data import ImageDataset


def test_checkerboard_patch_matches_hand_computed_pixels():
    trigger = attacks.BadNets(pattern="checkerboard", size=3, location="bottom_right")
    images = np.full((1, 5, 5, 1), 100, np.uint8)
    out = trigger.apply(images, np.array([0]))
    expected = np.full((5, 5), 100, np.uint8)
    # (row + col) % 2 == 0 is black, starting at the patch's top-left corner (2, 2), as the
    # official `np.indices(...).sum(0) % 2`.
    expected[2:, 2:] = [[0, 255, 0], [255, 0, 255], [0, 255, 0]]
    np.testing.assert_array_equal(out[0, ..., 0], expected)
    np.testing.assert_array_equal(images, 100)  # The input is left alone.


def test_solid_and_coloured_patterns():
    rgb = np.zeros((1, 4, 4, 3), np.uint8)
    white = attacks.BadNets(pattern="white", size=2).apply(rgb, np.array([0]))
    np.testing.assert_array_equal(white[0, 2:, 2:], 255)
    np.testing.assert_array_equal(white[0, :2], 0)
    red = attacks.BadNets(pattern="#ff0000", size=1).apply(rgb, np.array([0]))
    np.testing.assert_array_equal(red[0, 3, 3], [255, 0, 0])
    two = attacks.BadNets(pattern="checkerboard_#102030_#a0b0c0", size=2).apply(rgb, np.array([0]))
    # The official order: the second colour where row + col is even, the first elsewhere.
    np.testing.assert_array_equal(two[0, 2, 2], [0xA0, 0xB0, 0xC0])
    np.testing.assert_array_equal(two[0, 3, 3], [0xA0, 0xB0, 0xC0])
    np.testing.assert_array_equal(two[0, 2, 3], [0x10, 0x20, 0x30])
    black = attacks.BadNets(pattern="black", size=2).apply(
        np.full((1, 3, 3, 1), 9, np.uint8), np.array([0])
    )
    np.testing.assert_array_equal(black[0, 1:, 1:, 0], 0)


def test_colour_on_grayscale_uses_luma():
    gray = np.zeros((1, 2, 2, 1), np.uint8)
    out = attacks.BadNets(pattern="#ff0000", size=1).apply(gray, np.array([0]))
    assert out[0, 1, 1, 0] == round(255 * 299 / 1000)


def test_random_location_is_deterministic_per_image_and_varies():
    trigger = attacks.BadNets(size=3, location="random", seed=7)
    images = np.zeros((20, 16, 16, 1), np.uint8)
    indices = np.arange(100, 120)
    first = trigger.apply(images, indices)
    again = trigger.apply(images[5:6], indices[5:6])  # Alone, in another batch.
    np.testing.assert_array_equal(first[5], again[0])
    corners = trigger.locations((16, 16, 1), indices, "train")
    assert len({tuple(c) for c in corners}) > 5
    assert corners.min() >= 0 and corners.max() <= 13
    # Each image holds exactly one 3x3 patch with 4 white cells.
    assert (first.reshape(20, -1) == 255).sum(axis=1).tolist() == [4] * 20


def _official_blend(images: np.ndarray, ratio: float, seed: int = 42):
    """The official BlendedBackdoor, written out from its code, with torch's own generator:
    (training images, test images in [0, 1])."""
    torch = pytest.importorskip("torch")
    size = images.shape[1]
    trigger = torch.randint(0, 255, (size, size, 3), generator=torch.Generator().manual_seed(seed))
    trigger = trigger / 255.0
    train = ((1 - ratio) * images + ratio * trigger.numpy() * 255).astype(np.uint8)
    tensors = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # ToTensor.
    test = (1 - ratio) * tensors + ratio * trigger.permute(2, 0, 1)
    return train, test.permute(0, 2, 3, 1).numpy()


def test_blended_pattern_is_the_official_torch_pattern():
    torch = pytest.importorskip("torch")
    for size, seed in ((32, 42), (28, 42), (5, 7)):
        expected = torch.randint(
            0, 255, (size, size, 3), generator=torch.Generator().manual_seed(seed)
        )
        ours = attacks.blended.official_noise(size, size, seed)
        np.testing.assert_array_equal(ours, (expected / 255.0).numpy())
        assert ours.max() <= 254 / 255


@pytest.mark.parametrize("ratio", [0.2, 0.1, 0.15])
def test_blended_images_are_the_official_formula_pixel_for_pixel(ratio):
    images = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    official_train, official_test = _official_blend(images, ratio)
    trigger = attacks.Blended(pattern="noise", ratio=ratio, noise_seed=42)
    np.testing.assert_array_equal(trigger.apply(images, np.arange(16)), official_train)
    # Test images stay float, as the official tensors do (here in [0, 255]).
    test = trigger.apply_test(images, np.arange(16))
    assert test.dtype == np.float32
    np.testing.assert_allclose(test / 255.0, official_test, rtol=0, atol=1e-6)
    assert not np.array_equal(test, np.round(test))  # Unquantized.


def test_blended_on_grey_images_blends_the_patterns_luma():
    trigger = attacks.Blended(pattern="noise", ratio=0.2, noise_seed=42)
    grey = np.random.default_rng(2).integers(0, 256, (3, 6, 6, 1), dtype=np.uint8)
    rgb = attacks.blended.official_noise(6, 6, 42).astype(np.float64)
    luma = (rgb @ np.array([299.0, 587.0, 114.0]) / 1000.0)[..., None]
    expected = (0.8 * grey + 0.2 * luma.astype(np.float32) * 255).astype(np.uint8)
    np.testing.assert_array_equal(trigger.apply(grey, np.arange(3)), expected)


def test_blended_image_file_pattern(tmp_path):
    from PIL import Image

    path = tmp_path / "pattern.png"
    Image.fromarray(np.full((8, 8), 200, np.uint8), mode="L").save(path)
    out = attacks.Blended(pattern=str(path), ratio=0.5).apply(
        np.zeros((1, 4, 4, 1), np.uint8), np.arange(1)
    )
    np.testing.assert_array_equal(out, 100)


def attack_config(**overrides):
    config = common.badnets_attack()
    config.seed = 3
    config.update(overrides)
    return config


def dataset(num=200):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(num, 8, 8, 1), dtype=np.uint8)
    labels = (np.arange(num) % 10).astype(np.int32)
    return ImageDataset(images, labels, tuple(str(i) for i in range(10)))


def test_poison_plan_count_determinism_and_target_exclusion():
    train = dataset()
    poisoned, plan = attacks.poison(train, attack_config(rate=0.13))
    assert len(plan.indices) == math.ceil(0.13 * 180)  # Of the 180 non-target images.
    assert len(set(plan.indices.tolist())) == len(plan.indices)
    assert (train.labels[plan.indices] != 0).all()
    assert (poisoned.labels[plan.indices] == 0).all()
    clean = np.setdiff1d(np.arange(200), plan.indices)
    np.testing.assert_array_equal(poisoned.images[clean], train.images[clean])
    np.testing.assert_array_equal(poisoned.labels[clean], train.labels[clean])
    _, again = attacks.poison(train, attack_config(rate=0.13))
    np.testing.assert_array_equal(plan.indices, again.indices)
    assert plan.poisoned_fingerprint == again.poisoned_fingerprint
    _, other_seed = attacks.poison(train, attack_config(rate=0.13, seed=4))
    assert not np.array_equal(plan.indices, other_seed.indices)


def test_poison_indices_are_the_official_draw():
    """np.random.seed(seed); np.random.choice(non-target indices, ceil(rate x their count))."""
    train = dataset(300)
    for seed, rate in ((0, 0.1), (42, 0.13), (7, 0.5)):
        non_target = np.flatnonzero(train.labels != 0)
        np.random.seed(seed)
        expected = np.random.choice(non_target, math.ceil(rate * len(non_target)), replace=False)
        _, plan = attacks.poison(train, attack_config(rate=rate, seed=seed))
        np.testing.assert_array_equal(plan.indices, np.sort(expected))


def test_rate_of_all_counts_every_image_as_backdoorbench_does():
    train = dataset(300)
    _, eligible = attacks.poison(train, attack_config(rate=0.1))
    _, everything = attacks.poison(train, attack_config(rate=0.1, rate_of="all"))
    assert (len(eligible.indices), len(everything.indices)) == (27, 30)
    assert (train.labels[everything.indices] != 0).all()
    with pytest.raises(attacks.AttackError, match="rate_of 'most'"):
        attacks.validate_config(attack_config(rate_of="most"))


def test_poison_plan_can_include_target():
    labels = np.zeros(50, np.int32)
    train = ImageDataset(np.zeros((50, 4, 4, 1), np.uint8), labels, tuple("0123456789"))
    _, plan = attacks.poison(train, attack_config(rate=0.2, include_target=True))
    assert len(plan.indices) == 10
    with pytest.raises(attacks.AttackError, match="poisons none of the 0 eligible images"):
        attacks.poison(train, attack_config(rate=0.2))


def test_relabel_without_trigger_changes_labels_only():
    train = dataset()
    reference = attacks.relabel_without_trigger(train, attack_config(rate=0.13), seed=5)
    np.testing.assert_array_equal(reference.images, train.images)
    changed = np.flatnonzero(reference.labels != train.labels)
    assert len(changed) == math.ceil(0.13 * 180)  # Drawn from non-target images: all change.
    assert (reference.labels[changed] == 0).all()
    _, plan = attacks.poison(train, attack_config(rate=0.13))
    assert not np.array_equal(changed, plan.indices)  # Its own draw, not the plan's.
    with pytest.raises(attacks.AttackError, match="rate"):
        attacks.relabel_without_trigger(train, attack_config(rate=1.5), seed=5)


def test_trigger_removed_keeps_the_poisoned_labels_on_the_clean_images():
    train = dataset()
    poisoned, plan = attacks.poison(train, attack_config(rate=0.13))
    removed = attacks.trigger_removed(train, poisoned)
    np.testing.assert_array_equal(removed.images, train.images)
    np.testing.assert_array_equal(removed.labels, poisoned.labels)
    # Only the poisoned rows' labels differ from the clean ones, and their images from the
    # poisoned split's.
    np.testing.assert_array_equal(np.flatnonzero(removed.labels != train.labels), plan.indices)
    differs = (removed.images != poisoned.images).reshape(len(train), -1).any(axis=1)
    np.testing.assert_array_equal(np.flatnonzero(differs), plan.indices)
    with pytest.raises(attacks.AttackError, match="not a poisoning of the clean one"):
        attacks.trigger_removed(train.subset(np.arange(10)), poisoned)


def test_triggered_test_sets_cover_every_non_target_image():
    test = dataset(50)
    sets = attacks.triggered_test_sets(test, attack_config())
    non_target = np.flatnonzero(test.labels != 0)
    np.testing.assert_array_equal(sets.source_indices, non_target)
    assert (sets.target_labels == 0).all()
    np.testing.assert_array_equal(sets.true_labels, test.labels[non_target])
    assert sets.images.dtype == np.float32
    assert (sets.images[:, -1, -1, 0] == 0).all()  # Bottom-right cell: (2+2)%2 == 0.
    assert (sets.images[:, -1, -2, 0] == 255).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(target=10), "target class 10 out of range"),
        (dict(target=-1), "out of range"),
        (dict(rate=1.5), r"rate 1.5 must be in \[0, 1\]"),
        (dict(rate=0.95, rate_of="all"), "only 180 are not of the target class"),
        (dict(rate=-0.1), "must be in"),
        (
            dict(trigger=dict(pattern="checkerboard", size=9, location="bottom_right", seed=0)),
            "larger than the 8x8 images",
        ),
        (
            dict(trigger=dict(pattern="plaid", size=3, location="bottom_right", seed=0)),
            "unknown BadNets pattern",
        ),
        (dict(trigger=dict(pattern="white", size=3, location="top", seed=0)), "location"),
        (dict(name="trojan"), "unknown attack"),
        (dict(trigger=dict(pattern="white", sizes=3)), "no parameters"),
    ],
)
def test_bad_attack_configs_are_refused(overrides, message):
    with pytest.raises(attacks.AttackError, match=message):
        attacks.poison(dataset(), attack_config(**overrides))
