"""BadNets (Gu et al. 2017): a square patch pasted over the image."""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np

from jaxclean.attacks.base import HEX_COLOUR, AttackError, Trigger, parse_colour, to_channels

LOCATIONS = ("bottom_right", "random")


@dataclasses.dataclass(frozen=True)
class BadNets(Trigger):
    """A square patch pasted over the image, as the official code's PatchBackdoor draws it.

    Attributes:
      pattern: "checkerboard" (black where row + col is even, white where odd), "white",
        "black", "#rrggbb", or "checkerboard_#rrggbb_#rrggbb" (the second colour where row +
        col is even, the first elsewhere).
      size: the patch's side in pixels.
      location: "bottom_right", or "random": a corner drawn per image from (seed, index,
        split). The official code seeds Python's `random` with the image's pixel sum, twice,
        so its row and column are always equal and depend on the content; this draws both
        freely and reproducibly instead (docs/attacks.md).
      seed: seeds the random locations.
    """

    pattern: str = "checkerboard"
    size: int = 3
    location: str = "bottom_right"
    seed: int = 0

    def __post_init__(self):
        if self.location not in LOCATIONS:
            raise AttackError(f"BadNets location {self.location!r}: use one of {LOCATIONS}")
        if self.size < 1:
            raise AttackError(f"BadNets patch size {self.size} must be at least 1")
        self._colours()  # Validates the pattern now, not at first use.

    def _colours(self) -> tuple[np.ndarray, np.ndarray]:
        """The colours of the (row + col) % 2 == 0 and == 1 cells."""
        black, white = np.zeros(3), np.full(3, 255.0)
        if self.pattern == "checkerboard":
            return black, white
        if self.pattern == "white":
            return white, white
        if self.pattern == "black":
            return black, black
        match = re.fullmatch(f"checkerboard_({HEX_COLOUR})_({HEX_COLOUR})", self.pattern)
        if match:
            first, second = parse_colour(match.group(1)), parse_colour(match.group(2))
            return second, first
        if re.fullmatch(HEX_COLOUR, self.pattern):
            colour = parse_colour(self.pattern)
            return colour, colour
        raise AttackError(
            f"unknown BadNets pattern {self.pattern!r}: use checkerboard, white, black, "
            "#rrggbb or checkerboard_#rrggbb_#rrggbb"
        )

    def patch(self, channels: int) -> np.ndarray:
        """The patch as uint8 [size, size, channels]."""
        even, odd = (to_channels(c, channels) for c in self._colours())
        rows, cols = np.indices((self.size, self.size))
        parity = ((rows + cols) % 2)[..., None]
        return np.round(np.where(parity == 0, even, odd)).astype(np.uint8)

    def validate(self, image_shape) -> None:
        height, width, channels = image_shape
        to_channels(np.zeros(3), channels)
        if self.size > height or self.size > width:
            raise AttackError(
                f"BadNets trigger of size {self.size} is larger than the {height}x{width} images"
            )

    def locations(self, image_shape, indices: np.ndarray, stream: str) -> np.ndarray:
        """Top-left corners [N, 2] of the patch for the images with these indices."""
        height, width, _ = image_shape
        if self.location == "bottom_right":
            corner = (height - self.size, width - self.size)
            return np.tile(np.array(corner), (len(indices), 1))
        stream_id = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")
        corners = []
        for index in indices:
            rng = np.random.default_rng([self.seed, stream_id, int(index)])
            corners.append(
                (rng.integers(0, height - self.size + 1), rng.integers(0, width - self.size + 1))
            )
        return np.array(corners, dtype=np.int64).reshape(-1, 2)

    def apply(self, images: np.ndarray, indices: np.ndarray, stream: str = "train") -> np.ndarray:
        """A copy of uint8 `images` with the patch pasted.

        Args:
          images: uint8 [N, H, W, C].
          indices: each image's index in its split; decides random locations.
          stream: the split's name, so train and test images of equal index differ.
        """
        self.validate(images.shape[1:])
        out = images.copy()
        patch = self.patch(images.shape[-1])
        for i, (row, col) in enumerate(self.locations(images.shape[1:], indices, stream)):
            out[i, row : row + self.size, col : col + self.size] = patch
        return out
