"""Evaluation of a trained classifier: clean accuracy, attack success rate, robust accuracy."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxclean.attacks import TriggeredTestSets
from jaxclean.data import ImageDataset
from jaxclean.train import predict


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels)) if len(labels) else float("nan")


def predictions(predict_fn, variables, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
    """Predicted class of every image."""
    return np.argmax(predict(predict_fn, variables, images, batch_size, mesh), axis=-1)


class Predictions(NamedTuple):
    """A classifier's predicted classes on the clean test set and on its triggered copies."""

    clean: np.ndarray
    triggered: np.ndarray | None  # None when there is no attack.


def classifier_predictions(
    predict_fn,
    variables,
    test: ImageDataset,
    triggered: TriggeredTestSets | None,
    batch_size: int,
    mesh,
) -> Predictions:
    """The one pass of inference every metric here is computed from
    (`metrics_from_predictions`, `target_rates_by_class`)."""
    clean = predictions(predict_fn, variables, test.images, batch_size, mesh)
    if triggered is None:
        return Predictions(clean, None)
    return Predictions(
        clean, predictions(predict_fn, variables, triggered.images, batch_size, mesh)
    )


def metrics_from_predictions(
    predicted: Predictions, test: ImageDataset, triggered: TriggeredTestSets | None
) -> dict:
    """CA on the clean test set; ASR and RA on every triggered non-target test image.

    Beside ASR, the rate at which the same non-target images *without* the trigger are called
    the target: any classifier sends some of them there (shirts to T-shirt), so ASR minus this
    is what the trigger itself does. A model that reads triggered images by their content (high
    RA) makes its ordinary errors on them too, and its ASR cannot fall below this rate; a clean
    model that cannot read them sends them elsewhere, and its ASR can.

    Returns:
      {"clean_accuracy", "attack_success_rate", "untriggered_target_rate", "robust_accuracy"};
      the last three are absent when there is no attack.
    """
    results = {"clean_accuracy": accuracy(predicted.clean, test.labels)}
    if triggered is not None:
        results["untriggered_target_rate"] = accuracy(
            predicted.clean[triggered.source_indices], triggered.target_labels
        )
        results["attack_success_rate"] = accuracy(predicted.triggered, triggered.target_labels)
        results["robust_accuracy"] = accuracy(predicted.triggered, triggered.true_labels)
    return results


def target_rates_by_class(
    untriggered: np.ndarray,
    triggered: np.ndarray,
    labels: np.ndarray,
    target: int,
    num_classes: int,
) -> dict:
    """Where ASR and ASR0 come from, per true class of the triggered non-target images.

    `untriggered` and `triggered` are a classifier's predictions on the same non-target images
    without and with the trigger, `labels` their true classes. A backdoor raises the target
    rate in every class; a classifier that cannot read triggered images at all (low RA) sends
    them to a few classes, and its ASR is whatever share of those is the target.

    Returns:
      {"untriggered_target_rate": [rate per class], "triggered_target_rate": [...],
       "triggered_predictions": [count per predicted class]}; classes with no image get nan.
    """

    def per_class_target_rate(predictions):
        return [
            accuracy(predictions[labels == c], np.full((labels == c).sum(), target))
            for c in range(num_classes)
        ]

    return {
        "untriggered_target_rate": per_class_target_rate(untriggered),
        "triggered_target_rate": per_class_target_rate(triggered),
        "triggered_predictions": np.bincount(triggered, minlength=num_classes).tolist(),
    }
