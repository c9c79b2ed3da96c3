"""Evaluation of a trained classifier: clean accuracy, attack success rate, robust accuracy."""

from __future__ import annotations

import numpy as np

from jaxclean.attacks import TriggeredTestSets
from jaxclean.data import ImageDataset
from jaxclean.train import predict


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels)) if len(labels) else float("nan")


def predictions(predict_fn, variables, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
    """Predicted class of every image."""
    return np.argmax(predict(predict_fn, variables, images, batch_size, mesh), axis=-1)


def evaluate_classifier(
    predict_fn,
    variables,
    test: ImageDataset,
    triggered: TriggeredTestSets | None,
    batch_size: int,
    mesh,
) -> dict:
    """CA on the clean test set; ASR and RA on every triggered non-target test image.

    Returns:
      {"clean_accuracy", "attack_success_rate", "robust_accuracy"}; the last two are absent
      when there is no attack.
    """
    results = {
        "clean_accuracy": accuracy(
            predictions(predict_fn, variables, test.images, batch_size, mesh), test.labels
        )
    }
    if triggered is not None:
        triggered_predictions = predictions(
            predict_fn, variables, triggered.robust.images, batch_size, mesh
        )
        results["attack_success_rate"] = accuracy(
            triggered_predictions, triggered.attack_success.labels
        )
        results["robust_accuracy"] = accuracy(triggered_predictions, triggered.robust.labels)
    return results
