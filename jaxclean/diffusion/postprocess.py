"""What is done to every variation after sampling, on its uint8 pixels.

Kept apart from the sampler, which makes the same variation of an image whatever the data: a
post-processing step is a choice about one dataset's images. The regeneration applies it to
every row it writes, sampled or copied from another run (`regenerate.reuse_from`), so a run may
reuse variations post-processed by a step its own covers (see `Postprocess.covers`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxclean.checks import ConfigError


@dataclasses.dataclass(frozen=True)
class Postprocess:
    """Attributes:
    black_level: uint8 values below it are set to 0 (0: off). For data whose backgrounds are
      pure black (Fashion-MNIST), where a latent decoder leaves a faint haze that a classifier
      can read as a trigger of its own (docs/experiments.md: "The black level").
    """

    black_level: int = 0

    def __post_init__(self):
        if not 0 <= self.black_level <= 255:
            raise ConfigError(
                f"regenerate.postprocess.black_level {self.black_level} must be in [0, 255]"
            )

    @classmethod
    def from_config(cls, config) -> Postprocess:
        """From config.regenerate.postprocess."""
        return cls(black_level=config.black_level)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """The processed copy of uint8 `pixels` (any shape)."""
        pixels = np.asarray(pixels)
        return np.where(pixels < self.black_level, np.zeros_like(pixels), pixels)

    def covers(self, other: Postprocess) -> bool:
        """Whether applying this step to `other`'s output gives this step's output, so that
        variations made with `other` may be reused: a black level at or above theirs."""
        return self.black_level >= other.black_level
