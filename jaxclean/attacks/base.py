"""What every attack shares: its error, colours, and the interface a trigger implements.

A trigger is a frozen dataclass whose fields are its config parameters (config.attack.trigger),
checked in __post_init__, with:

  validate(image_shape)            refuse what cannot be applied to these images (AttackError)
  apply(images, indices, stream)   uint8 NHWC -> uint8 NHWC: the poisoned training images
                                   ("train") or the diagnostics' triggered sources ("test")
  apply_test(images, indices)      uint8 NHWC -> float32 NHWC in [0, 255]: the triggered test
                                   images ASR and RA are measured on, unquantized where the
                                   attack's own code leaves them so

and two optional class attributes: `clean_label` (it poisons images of the target class and
keeps their labels) and `cross_ratio` (it also adds that many times as many samples with a
random trigger and their own labels, `cross_samples`).
"""

from __future__ import annotations

import re

import numpy as np


class AttackError(ValueError):
    """An attack configured in a way that cannot be applied."""


HEX_COLOUR = r"#[0-9a-fA-F]{6}"
# ITU-R 601 luma in thousandths, as PIL's "L" mode converts RGB: what grey keeps of a colour.
LUMA_PERMILLE = np.array([299.0, 587.0, 114.0])


def parse_colour(text: str) -> np.ndarray:
    if not re.fullmatch(HEX_COLOUR, text):
        raise AttackError(f"colour {text!r} is not of the form #rrggbb")
    return np.array([int(text[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """RGB values [..., 3] as `channels` values: 3 as they are, 1 as their luma."""
    if channels == 3:
        return rgb
    if channels == 1:
        return (np.asarray(rgb, np.float64) @ LUMA_PERMILLE / 1000.0)[..., None]
    raise AttackError(f"images with {channels} channels are not supported (use 1 or 3)")


class Trigger:
    """Defaults of the trigger interface (see the module docstring)."""

    clean_label = False
    cross_ratio = 0.0

    def apply_test(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return self.apply(images, indices, stream="test").astype(np.float32)
