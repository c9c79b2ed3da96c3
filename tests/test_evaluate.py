"""CA, ASR, RA and ASR's untriggered floor against counts known by construction."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NUM_CLASSES, REPO, synthetic_images

from configs import common
from jaxclean import attacks, evaluate, sharding, train
from jaxclean.attacks import TriggeredTestSets
from jaxclean.data import ImageDataset


def band_classifier(variables, images, train):
    """Predicts the class whose horizontal band is brightest (synthetic_images' rule)."""
    del variables, train
    bands = images[..., 0].reshape(len(images), NUM_CLASSES, -1)
    return jax.nn.one_hot(jnp.argmax(bands.mean(-1), -1), NUM_CLASSES)


def test_untriggered_target_rate_counts_the_same_images_without_the_trigger():
    images, labels = synthetic_images(40, seed=0, size=30)
    images = images[..., None]
    target = 0
    non_target = np.flatnonzero(labels != target)
    # Three non-target images that the classifier calls the target with no trigger at all.
    confused = non_target[:3]
    images[confused, :3] = 255
    # The "trigger" lights the target's band: every triggered image goes to the target,
    # except two whose own band is lit brighter still (they keep their true class).
    triggered = images[non_target].copy()
    triggered[:, :3] = 240
    kept = [5, 6]
    for i in kept:
        label = labels[non_target[i]]
        triggered[i, label * 3 : (label + 1) * 3] = 255
    sets = TriggeredTestSets(
        attack_success=ImageDataset(triggered, np.full(len(non_target), target), ()),
        robust=ImageDataset(triggered, labels[non_target], ()),
        source_indices=non_target,
    )
    mesh = sharding.make_mesh()
    predict_fn = train.make_predict_fn(band_classifier, mesh)
    test = ImageDataset(images, labels, ())
    predicted = evaluate.classifier_predictions(predict_fn, {}, test, sets, 8, mesh)
    metrics = evaluate.metrics_from_predictions(predicted, test, sets)
    n = len(non_target)
    assert metrics["clean_accuracy"] == (len(labels) - 3) / len(labels)
    assert metrics["untriggered_target_rate"] == 3 / n
    assert metrics["attack_success_rate"] == (n - len(kept)) / n
    assert metrics["robust_accuracy"] == len(kept) / n
    no_attack = evaluate.classifier_predictions(predict_fn, {}, test, None, 8, mesh)
    assert no_attack.triggered is None
    assert set(evaluate.metrics_from_predictions(no_attack, test, None)) == {"clean_accuracy"}
    # The single inference pass behind them: one prediction per image of each set.
    assert predicted.clean.shape == labels.shape
    assert predicted.triggered.shape == (n,)
    assert (predicted.triggered != target).sum() == len(kept)


def test_target_rates_by_class_splits_asr_and_its_floor_by_true_class():
    labels = np.array([1, 1, 1, 1, 2, 2, 3])
    untriggered = np.array([0, 1, 1, 1, 2, 2, 3])
    triggered = np.array([0, 0, 1, 1, 2, 0, 2])
    rates = evaluate.target_rates_by_class(untriggered, triggered, labels, target=0, num_classes=4)
    np.testing.assert_allclose(rates["untriggered_target_rate"], [np.nan, 0.25, 0.0, 0.0])
    np.testing.assert_allclose(rates["triggered_target_rate"], [np.nan, 0.5, 0.5, 0.0])
    assert rates["triggered_predictions"] == [3, 2, 2, 0]
    # Weighted by class size, the per-class rates give back ASR and ASR0.
    sizes = np.bincount(labels, minlength=4)[1:]
    assert np.dot(sizes, rates["triggered_target_rate"][1:]) / len(labels) == np.mean(
        triggered == 0
    )


def test_blend_probe_splits_a_blend_into_its_contrast_and_pattern_parts():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from probe_blend_parts import blend_parts

    config = common.blended_attack()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    rows = np.arange(6)
    blended = attacks.make_trigger(config).apply(images, rows, stream="test")
    parts = {k: v.astype(float) for k, v in blend_parts(images, blended, 0.2).items()}
    np.testing.assert_array_equal(parts["blend"], blended)
    np.testing.assert_array_equal(parts["original"], images)
    # The two parts together make the blend again (up to clipping and rounding each to uint8).
    inside = (parts["pattern_noise_only"] > 0) & (parts["pattern_noise_only"] < 255)
    rebuilt = parts["contrast_and_level_only"] + parts["pattern_noise_only"] - parts["original"]
    assert np.abs(rebuilt - parts["blend"])[inside].max() <= 1.5
    # The contrast part is a flat affine map of each image: 0.8 x + a level.
    np.testing.assert_allclose(
        parts["contrast_and_level_only"] - 0.8 * parts["original"],
        parts["contrast_and_level_only"][0, 0, 0, 0] - 0.8 * parts["original"][0, 0, 0, 0],
        atol=1.0,
    )


def test_twin_comparison_finds_a_brightening_and_a_pixel_pattern():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from compare_twins import pair_statistics, pattern_correlation

    rng = np.random.default_rng(0)
    clean = rng.integers(20, 200, (50, 8, 8, 1)).astype(np.uint8)
    pattern = rng.uniform(0, 255, (8, 8, 1))
    # Twins that carry the pattern's pixels: +/- 10 grey levels where it is above/below mean.
    traced = (clean + np.where(pattern > pattern.mean(), 10, -10)).astype(np.uint8)
    brighter = (clean + 5).astype(np.uint8)
    assert pattern_correlation(traced, clean, pattern) > 0.8
    stats = pair_statistics(brighter, clean)
    assert stats["mean_difference"] == pytest.approx(5.0)
    assert stats["paired_accuracy_brighter"] == 1.0
    assert stats["mean_absolute_pixel_difference"] == pytest.approx(5.0)
    # Identical pairs: nothing separates them, every statistic at chance.
    same = pair_statistics(clean, clean)
    assert same["paired_accuracy_lower_std"] == 0.5 and same["mean_difference"] == 0.0


def test_embedding_moves_separate_a_common_shift_from_scatter():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from embedding_moves import embedding_moves

    trusted = np.array([[0.0, 0.0], [10.0, 0.0]])
    clean = np.array([[1.0, 0.0], [2.0, 0.0], [9.0, 0.0], [8.0, 0.0]])  # 1, 2, 1, 2 away.
    shifted = embedding_moves(clean, clean + np.array([4.5, 0.0]), trusted)
    assert shifted["move"] == pytest.approx(4.5) and shifted["mean_shift"] == pytest.approx(4.5)
    assert shifted["nearest_trusted"] == pytest.approx(1.5)
    # The shift takes the two rows near the first point past the midpoint; the others stay.
    assert shifted["same_nearest"] == 0.5
    # Moves that cancel over the rows: as long, but no common part, and no neighbour changes.
    signs = np.array([1.0, -1.0, 1.0, -1.0])[:, None]
    scattered = embedding_moves(clean, clean + signs * np.array([0.0, 0.2]), trusted)
    assert scattered["move"] == pytest.approx(0.2) and scattered["mean_shift"] == pytest.approx(0.0)
    assert scattered["same_nearest"] == 1.0
