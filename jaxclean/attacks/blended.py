"""Blended (Chen et al. 2017): a full-image pattern blended into the image."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxclean.attacks.base import AttackError, Trigger, to_channels


def official_noise(height: int, width: int, seed: int) -> np.ndarray:
    """The official code's noise pattern: float32 [H, W, 3] in [0, 254 / 255].

    It is `torch.randint(0, 255, (S, S, 3), generator=torch.Generator().manual_seed(seed))
    / 255` at the image's size: on the CPU that generator is MT19937 started by
    `init_genrand(seed)`, the state numpy's legacy RandomState(seed) starts from, and each
    element takes one 32-bit word modulo 255, in C order; the division is float32's.
    """
    words = np.random.RandomState(seed).randint(0, 2**32, size=height * width * 3, dtype=np.uint32)
    return (words % 255).astype(np.float32).reshape(height, width, 3) / np.float32(255.0)


@dataclasses.dataclass(frozen=True)
class Blended(Trigger):
    """(1 - ratio) * image + ratio * pattern, as the official code's BlendedBackdoor blends.

    Training images are blended in float64 and truncated to uint8, as the official code does
    to its numpy images; triggered test images are left unquantized (float), as it leaves its
    tensors. On one-channel images the pattern is its luma: what a grey image keeps of the
    official RGB blend (docs/attacks.md).

    Attributes:
      pattern: "noise" (the official random pattern from `noise_seed`) or an image file path.
      ratio: the pattern's weight.
      noise_seed: seeds the noise pattern (the official code's is 42).
    """

    pattern: str = "noise"
    ratio: float = 0.2
    noise_seed: int = 42

    def __post_init__(self):
        if not 0.0 < self.ratio <= 1.0:
            raise AttackError(f"Blended ratio {self.ratio} must be in (0, 1]")

    def validate(self, image_shape) -> None:
        self.pattern_array(tuple(image_shape))

    @functools.lru_cache(maxsize=4)  # noqa: B019  Frozen and hashable: one pattern per shape.
    def pattern_array(self, image_shape) -> np.ndarray:
        """The pattern at the images' size: float32 in [0, 1], as the images' channels."""
        height, width, channels = image_shape
        if self.pattern == "noise":
            rgb = official_noise(height, width, self.noise_seed)
        else:
            rgb = self._read_image(height, width) / np.float32(255.0)
        return to_channels(rgb, channels).astype(np.float32)

    def _read_image(self, height: int, width: int) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(self.pattern) as image:
                image = image.convert("RGB").resize((width, height), Image.BILINEAR)
                return np.asarray(image, dtype=np.float32)
        except OSError as e:
            raise AttackError(f"Blended pattern {self.pattern!r}: cannot read image: {e}") from e

    def apply(self, images: np.ndarray, indices: np.ndarray, stream: str = "train") -> np.ndarray:
        """The official arithmetic on numpy images, operation for operation: the image term in
        float64, the pattern term in float32, their sum truncated to uint8."""
        del indices, stream  # The same pattern for every image.
        pattern = self.pattern_array(tuple(images.shape[1:]))
        blended = (1 - self.ratio) * images + self.ratio * pattern * 255
        return np.clip(blended, 0, 255).astype(np.uint8)

    def apply_test(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """The official arithmetic on tensors in [0, 1] (float32, never quantized), scaled to
        [0, 255]."""
        del indices
        pattern = self.pattern_array(tuple(images.shape[1:]))
        unit = images.astype(np.float32) / np.float32(255.0)
        return ((1 - self.ratio) * unit + self.ratio * pattern) * np.float32(255.0)
