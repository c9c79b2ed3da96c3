"""Triggers against hand-computed pixels, and the poison plan's count, determinism and scope."""

import math

import ml_collections
import numpy as np
import pytest

from jaxclean import attacks
from jaxclean.data import ImageDataset


def test_checkerboard_patch_matches_hand_computed_pixels():
    trigger = attacks.BadNets(pattern="checkerboard", size=3, location="bottom_right")
    images = np.full((1, 5, 5, 1), 100, np.uint8)
    out = trigger.apply(images, np.array([0]))
    expected = np.full((5, 5), 100, np.uint8)
    # (row + col) % 2 == 0 is black, starting at the patch's top-left corner (2, 2).
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
    np.testing.assert_array_equal(two[0, 2, 2], [0x10, 0x20, 0x30])
    np.testing.assert_array_equal(two[0, 2, 3], [0xA0, 0xB0, 0xC0])
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


def test_blended_noise_matches_formula():
    trigger = attacks.Blended(pattern="noise", ratio=0.2, noise_seed=42)
    images = np.full((2, 4, 4, 1), 50, np.uint8)
    pattern = np.random.RandomState(42).randint(0, 256, size=(4, 4, 1))
    expected = np.round(0.8 * 50 + 0.2 * pattern).astype(np.uint8)
    out = trigger.apply(images, np.arange(2))
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(out[1], expected)


def test_blended_image_file_pattern(tmp_path):
    from PIL import Image

    path = tmp_path / "pattern.png"
    Image.fromarray(np.full((8, 8), 200, np.uint8), mode="L").save(path)
    out = attacks.Blended(pattern=str(path), ratio=0.5).apply(
        np.zeros((1, 4, 4, 1), np.uint8), np.arange(1)
    )
    np.testing.assert_array_equal(out, 100)


def attack_config(**overrides):
    config = ml_collections.ConfigDict(
        dict(
            name="badnets",
            target=0,
            rate=0.1,
            include_target=False,
            seed=3,
            trigger=dict(pattern="checkerboard", size=3, location="bottom_right", seed=0),
        )
    )
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
    assert len(plan.indices) == math.ceil(0.13 * 200)
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


def test_poison_plan_can_include_target():
    labels = np.zeros(50, np.int32)
    indices = attacks.choose_poison_indices(labels, 0.2, 0, seed=0, include_target=True)
    assert len(indices) == 10
    with pytest.raises(attacks.AttackError, match="eligible"):
        attacks.choose_poison_indices(labels, 0.2, 0, seed=0, include_target=False)


def test_relabel_without_trigger_changes_labels_only():
    train = dataset()
    reference = attacks.relabel_without_trigger(train, attack_config(rate=0.13), seed=5)
    np.testing.assert_array_equal(reference.images, train.images)
    changed = np.flatnonzero(reference.labels != train.labels)
    assert len(changed) == math.ceil(0.13 * 200)  # Drawn from non-target images: all change.
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
    assert (sets.attack_success.labels == 0).all()
    np.testing.assert_array_equal(sets.robust.labels, test.labels[non_target])
    assert (sets.robust.images[:, -1, -1, 0] == 0).all()  # Bottom-right cell: (2+2)%2 == 0.
    assert (sets.robust.images[:, -1, -2, 0] == 255).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(target=10), "target class 10 out of range"),
        (dict(target=-1), "out of range"),
        (dict(rate=1.5), r"rate 1.5 must be in \[0, 1\]"),
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
        (dict(name="sig"), "unknown attack"),
        (dict(trigger=dict(pattern="white", sizes=3)), "no parameters"),
    ],
)
def test_bad_attack_configs_are_refused(overrides, message):
    with pytest.raises(attacks.AttackError, match=message):
        attacks.poison(dataset(), attack_config(**overrides))
