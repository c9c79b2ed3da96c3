"""WaNet, SIG and BppAttack: their triggers against hand-computed values or PyTorch's own
resampling, and what each does to the poison plan (noise-mode samples, clean labels)."""

import math

import numpy as np
import pytest

from configs import common
from jaxclean import attacks
from jaxclean.attacks import wanet
from jaxclean.data import ImageDataset


def dataset(num=200, size=8, channels=1):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(num, size, size, channels), dtype=np.uint8)
    labels = (np.arange(num) % 10).astype(np.int32)
    return ImageDataset(images, labels, tuple(str(i) for i in range(10)))


# ----------------------------------------------------------------------------- WaNet


def test_wanet_grid_and_warp_are_pytorchs_bicubic_and_grid_sample():
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    trigger = attacks.WaNet(k=4, s=0.5, seed=3)
    size = 12
    control = np.random.default_rng([3, 0]).uniform(-1.0, 1.0, (2, 4, 4))
    control = control / np.mean(np.abs(control))
    noise = functional.interpolate(
        torch.from_numpy(control)[None], size=size, mode="bicubic", align_corners=True
    ).permute(0, 2, 3, 1)
    axis = torch.linspace(-1, 1, size, dtype=torch.float64)
    x, y = torch.meshgrid(axis, axis, indexing="ij")
    identity = torch.stack((y, x), 2)[None]
    expected = torch.clamp(identity + 0.5 * noise / size, -1, 1)
    np.testing.assert_allclose(trigger.grid(size), expected.numpy(), atol=1e-12)
    images = np.random.default_rng(4).uniform(0, 255, (3, size, size, 2))
    warped = functional.grid_sample(
        torch.from_numpy(images).permute(0, 3, 1, 2),
        expected.expand(3, -1, -1, -1),
        align_corners=True,
    )
    ours = wanet.warp(images, trigger.grid(size))
    np.testing.assert_allclose(ours, warped.permute(0, 2, 3, 1).numpy(), atol=1e-9)


def test_wanet_warps_every_image_alike_and_moves_pixels():
    trigger = attacks.WaNet(k=4, s=4.0)  # Strong enough to move pixels at 16 px.
    images = dataset(4, size=16).images
    out = trigger.apply(images, np.arange(4))
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert np.abs(out.astype(int) - images).mean() > 1.0
    np.testing.assert_array_equal(trigger.apply(images[2:3], np.array([9])), out[2:3])
    assert trigger.apply_test(images, np.arange(4)).dtype == np.float32
    # The identity warp (s tiny) leaves images as they are.
    still = attacks.WaNet(k=4, s=1e-6).apply(images, np.arange(4))
    np.testing.assert_array_equal(still, images)


def test_wanet_adds_noise_mode_samples_that_keep_their_labels():
    train = dataset(200, size=8)
    config = common.attack_config("wanet", dict(k=4, s=2.0, cross_ratio=2.0, seed=0))
    poisoned, plan = attacks.poison(train, config)
    assert len(plan.indices) == math.ceil(0.1 * 180)
    assert len(plan.cross_indices) == 2 * len(plan.indices)
    assert not set(plan.cross_indices) & set(plan.indices)
    np.testing.assert_array_equal(
        poisoned.labels[plan.cross_indices], train.labels[plan.cross_indices]
    )
    assert (poisoned.labels[plan.indices] == 0).all()
    # Each noise-mode sample is its own perturbation of the warp, not the warp itself.
    warped = attacks.WaNet(k=4, s=2.0).apply(train.images[plan.cross_indices], plan.cross_indices)
    assert not np.array_equal(poisoned.images[plan.cross_indices], warped)
    untouched = np.setdiff1d(np.arange(200), np.union1d(plan.indices, plan.cross_indices))
    np.testing.assert_array_equal(poisoned.images[untouched], train.images[untouched])
    assert plan.to_json()["cross_indices"] == plan.cross_indices.tolist()


@pytest.mark.parametrize(
    "trigger, message",
    [(dict(k=1), "k 1 must be at least 2"), (dict(s=0.0), "must be positive")],
)
def test_wanet_refuses_bad_parameters(trigger, message):
    with pytest.raises(attacks.AttackError, match=message):
        attacks.validate_config(common.attack_config("wanet", trigger))


# ----------------------------------------------------------------------------- SIG


def test_sig_adds_the_sinusoid_to_target_class_images_and_keeps_their_labels():
    train = dataset(200, size=12)
    config = common.attack_config("sig", dict(delta=20.0, frequency=6.0))
    config.rate = 0.5
    poisoned, plan = attacks.poison(train, config)
    targets = np.flatnonzero(train.labels == 0)
    assert plan.clean_label and len(plan.indices) == math.ceil(0.5 * len(targets))
    assert set(plan.indices) <= set(targets)
    np.testing.assert_array_equal(poisoned.labels, train.labels)  # No label changes.
    columns = np.arange(12)
    signal = 20.0 * np.sin(2 * np.pi * columns * 6.0 / 12)
    expected = np.round(np.clip(train.images[plan.indices] + signal[None, None, :, None], 0, 255))
    np.testing.assert_array_equal(poisoned.images[plan.indices], expected.astype(np.uint8))
    # At test time, on the other classes, unquantized.
    sets = attacks.triggered_test_sets(train, config)
    assert (train.labels[sets.source_indices] != 0).all() and sets.images.dtype == np.float32
    # Its label-noise reference has no label to move.
    assert attacks.relabel_without_trigger(train, config, seed=1) is train


def test_sig_rate_of_all_can_ask_for_more_than_the_target_class_holds():
    config = common.attack_config("sig", dict())
    config.update(rate=0.2, rate_of="all")
    with pytest.raises(attacks.AttackError, match="only 20 are of the target class"):
        attacks.poison(dataset(200), config)


# ----------------------------------------------------------------------------- BppAttack


def test_bpp_squeezes_to_its_levels_and_dithers():
    ramp = np.tile(np.linspace(0, 255, 32), (4, 32, 1))[..., None].round().astype(np.uint8)
    plain = attacks.BppAttack(squeeze_num=8, dithering=False).apply(ramp, np.arange(4))
    levels = np.round(np.arange(8) * 255 / 7)
    assert set(np.unique(plain)) <= set(levels)
    dithered = attacks.BppAttack(squeeze_num=8).apply(ramp, np.arange(4))
    assert set(np.unique(dithered)) <= set(levels)
    # On a grey between two levels, dithering mixes them to keep the mean; squeezing alone
    # moves every pixel to the nearest one.
    grey = np.full((2, 32, 32, 1), 100, np.uint8)
    squeezed = attacks.BppAttack(squeeze_num=8, dithering=False).apply(grey, np.arange(2))
    mixed = attacks.BppAttack(squeeze_num=8).apply(grey, np.arange(2))
    assert squeezed.mean() == 109 and abs(mixed.mean() - 100) < 1.5
    assert set(np.unique(mixed)) == {73, 109}
    # A value already on a level stays there.
    on_levels = np.full((1, 4, 4, 1), levels[3], np.uint8)
    np.testing.assert_array_equal(attacks.BppAttack().apply(on_levels, np.arange(1)), on_levels)


def test_bpp_poisons_and_relabels():
    train = dataset(100, size=6, channels=3)
    poisoned, plan = attacks.poison(train, common.attack_config("bpp", dict(squeeze_num=4)))
    assert (poisoned.labels[plan.indices] == 0).all() and not plan.clean_label
    assert len(np.unique(poisoned.images[plan.indices])) <= 4
    with pytest.raises(attacks.AttackError, match="squeeze_num 1"):
        attacks.validate_config(common.attack_config("bpp", dict(squeeze_num=1)))
