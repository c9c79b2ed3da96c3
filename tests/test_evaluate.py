"""CA, ASR, RA and ASR's untriggered floor against counts known by construction."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import NUM_CLASSES, synthetic_images

from jaxclean import evaluate, sharding, train
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
        images=triggered.astype(np.float32),  # Triggered test images are float.
        target_labels=np.full(len(non_target), target),
        true_labels=labels[non_target],
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
