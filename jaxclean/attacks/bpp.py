"""BppAttack (Wang et al., CVPR 2022), data-poisoning form: colour-depth squeezing as the
trigger, with Floyd-Steinberg dithering so the squeezed image keeps its look."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxclean.attacks.base import AttackError, Trigger


def squeeze(images: np.ndarray, levels: int) -> np.ndarray:
    """Each value to the nearest of `levels` evenly spaced grey levels in [0, 255]."""
    step = 255.0 / (levels - 1)
    return np.round(images / step) * step


def dither(images: np.ndarray, levels: int) -> np.ndarray:
    """Floyd-Steinberg error diffusion to `levels` levels per channel, in raster order."""
    work = images.astype(np.float64).copy()
    height, width = work.shape[1:3]
    for row in range(height):
        for col in range(width):
            old = work[:, row, col].copy()
            new = squeeze(np.clip(old, 0, 255), levels)
            work[:, row, col] = new
            error = old - new
            if col + 1 < width:
                work[:, row, col + 1] += error * 7 / 16
            if row + 1 < height:
                if col > 0:
                    work[:, row + 1, col - 1] += error * 3 / 16
                work[:, row + 1, col] += error * 5 / 16
                if col + 1 < width:
                    work[:, row + 1, col + 1] += error * 1 / 16
    return work


@dataclasses.dataclass(frozen=True)
class BppAttack(Trigger):
    """Images squeezed to `squeeze_num` levels per channel (BackdoorBench's 8).

    The attack's training-time part (adversarially perturbed negative samples) has no
    data-poisoning form and is left out.

    Attributes:
      squeeze_num: levels per channel.
      dithering: Floyd-Steinberg dithering (the paper's); False squeezes only.
    """

    squeeze_num: int = 8
    dithering: bool = True

    def __post_init__(self):
        if not 2 <= self.squeeze_num <= 255:
            raise AttackError(f"BppAttack squeeze_num {self.squeeze_num} must be in [2, 255]")

    def validate(self, image_shape) -> None:
        del image_shape  # Any image.

    def apply(self, images: np.ndarray, indices: np.ndarray, stream: str = "train") -> np.ndarray:
        del indices, stream
        values = images.astype(np.float64)
        squeezed = (
            dither(values, self.squeeze_num)
            if self.dithering
            else squeeze(values, self.squeeze_num)
        )
        return np.clip(np.round(squeezed), 0, 255).astype(np.uint8)
