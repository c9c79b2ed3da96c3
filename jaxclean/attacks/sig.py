"""SIG (Barni et al., ICIP 2019): a clean-label attack with a horizontal sinusoid."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxclean.attacks.base import AttackError, Trigger


@dataclasses.dataclass(frozen=True)
class SIG(Trigger):
    """x + delta * sin(2 pi j f / width) along each row (j: the column), clipped to [0, 255].

    Clean-label: it is added to training images *of the target class*, whose labels are kept
    (the attacker never mislabels), and at test time to images of the other classes.

    Attributes:
      delta: the sinusoid's amplitude in grey levels (the paper's 20; BackdoorBench's 40).
      frequency: periods across the image's width (f; 6 in both).
    """

    clean_label = True

    delta: float = 20.0
    frequency: float = 6.0

    def __post_init__(self):
        if self.delta <= 0 or self.frequency <= 0:
            raise AttackError(
                f"SIG delta {self.delta} and frequency {self.frequency} must be positive"
            )

    def validate(self, image_shape) -> None:
        del image_shape  # Any image.

    def signal(self, width: int) -> np.ndarray:
        """The sinusoid over one row: float64 [width]."""
        return self.delta * np.sin(2 * np.pi * np.arange(width) * self.frequency / width)

    def _added(self, images: np.ndarray) -> np.ndarray:
        return np.clip(images + self.signal(images.shape[2])[None, None, :, None], 0, 255)

    def apply(self, images: np.ndarray, indices: np.ndarray, stream: str = "train") -> np.ndarray:
        del indices, stream
        return np.round(self._added(images.astype(np.float64))).astype(np.uint8)

    def apply_test(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        del indices
        return self._added(images.astype(np.float32)).astype(np.float32)
