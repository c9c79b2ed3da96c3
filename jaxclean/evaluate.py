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

    Beside ASR, the rate at which the same non-target images *without* the trigger are called
    the target: any classifier sends some of them there (shirts to T-shirt), so ASR minus this
    is what the trigger itself does. A model that reads triggered images by their content (high
    RA) makes its ordinary errors on them too, and its ASR cannot fall below this rate; a clean
    model that cannot read them sends them elsewhere, and its ASR can.

    Returns:
      {"clean_accuracy", "attack_success_rate", "untriggered_target_rate", "robust_accuracy"};
      the last three are absent when there is no attack.
    """
    clean_predictions = predictions(predict_fn, variables, test.images, batch_size, mesh)
    results = {"clean_accuracy": accuracy(clean_predictions, test.labels)}
    if triggered is not None:
        results["untriggered_target_rate"] = accuracy(
            clean_predictions[triggered.source_indices], triggered.attack_success.labels
        )
        triggered_predictions = predictions(
            predict_fn, variables, triggered.robust.images, batch_size, mesh
        )
        results["attack_success_rate"] = accuracy(
            triggered_predictions, triggered.attack_success.labels
        )
        results["robust_accuracy"] = accuracy(triggered_predictions, triggered.robust.labels)
    return results
