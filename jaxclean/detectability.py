"""Trigger detectability: can a classifier tell what the trigger left in a variation?

The regeneration's premise is that no pixel of a trigger reaches a variation. The learnability
diagnostic tests it through a classifier trained on the poisoned labels, and so mixes what the
trigger left with two things that are not the trigger: the label noise of the poisoned rows
(which raises a model's target rate on any image it cannot classify) and how well a small model
reads triggered test images at all (Fashion-MNIST Blended: a fifth of them). This test takes
both out. Each poisoned training image is regenerated twice with the same noise and the same
label, once from its triggered source (the variation the student trains on) and once from its
clean source, so the two members of a pair differ only by what the trigger left. A detector is
trained to tell them apart on most pairs and scored on the rest: its paired accuracy (the share
of held-out pairs whose triggered member it scores higher) is 0.5 when nothing is left, whatever
its bias. The same detector on the sources themselves is the positive control.
"""

from __future__ import annotations

import numpy as np

from jaxclean import train
from jaxclean.data import ImageDataset

PAIR_CLASSES = ("from the clean source", "from the triggered source")


def split_pairs(num_pairs: int, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training pairs, held-out pairs): a seeded split of range(num_pairs), each sorted.

    Both members of a pair fall on the same side, so no held-out image has its twin in training.
    """
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out {held_out} must be in (0, 1)")
    num_test = int(round(num_pairs * held_out))
    if num_test < 1 or num_test >= num_pairs:
        raise ValueError(
            f"{num_pairs} pairs cannot be split with {held_out} held out: too few pairs"
        )
    order = np.random.default_rng(seed).permutation(num_pairs)
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def pair_dataset(triggered: np.ndarray, clean: np.ndarray) -> ImageDataset:
    """Both members of every pair as one labelled set: 1 for the triggered, 0 for the clean."""
    if triggered.shape != clean.shape:
        raise ValueError(f"pairs of unequal shapes: {triggered.shape} and {clean.shape}")
    count = len(triggered)
    return ImageDataset(
        np.concatenate([clean, triggered]),
        np.concatenate([np.zeros(count, np.int32), np.ones(count, np.int32)]),
        PAIR_CLASSES,
    )


def detector_scores(predict_fn, variables, images: np.ndarray, batch_size: int, mesh):
    """How strongly the detector calls each image triggered: logit(triggered) - logit(clean)."""
    logits = train.predict(predict_fn, variables, images, batch_size, mesh)
    return logits[:, 1] - logits[:, 0]


def paired_accuracy(scores_triggered: np.ndarray, scores_clean: np.ndarray) -> float:
    """The share of pairs whose triggered member scores higher, ties counting half.

    0.5 is chance (a detector that sees nothing, or gives every image the same score); 1.0 is
    a trigger seen in every pair. Comparing within a pair makes it blind to the detector's bias
    towards either class, which a plain accuracy is not.
    """
    if scores_triggered.shape != scores_clean.shape or scores_triggered.ndim != 1:
        raise ValueError(
            f"scores must be two equal 1-d arrays, got {scores_triggered.shape} and "
            f"{scores_clean.shape}"
        )
    wins = np.mean(scores_triggered > scores_clean)
    ties = np.mean(scores_triggered == scores_clean)
    return float(wins + 0.5 * ties)


def chance_standard_error(num_pairs: int) -> float:
    """The standard error of a paired accuracy at chance, over `num_pairs` independent pairs."""
    return float(np.sqrt(0.25 / num_pairs))
