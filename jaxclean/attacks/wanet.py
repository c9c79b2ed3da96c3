"""WaNet (Nguyen & Tran, ICLR 2021): a fixed, smooth warp of the image as the trigger.

In its data-poisoning form: the poisoned images are warped once, before training, and
`cross_ratio` times as many other images get a randomly perturbed warp with their own labels
(the attack's "noise mode"), so that what a model learns is the particular warp, not any
distortion.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxclean.attacks.base import AttackError, Trigger

_CUBIC_A = -0.75  # The cubic-convolution coefficient of PyTorch's (and OpenCV's) bicubic.


def _cubic(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    a = _CUBIC_A
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in]: bicubic upsampling with align_corners=True (PyTorch's), borders
    replicated."""
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    matrix = np.zeros((size_out, size_in))
    for out in range(size_out):
        source = out * scale
        base = int(np.floor(source))
        for tap in range(base - 1, base + 3):
            matrix[out, min(max(tap, 0), size_in - 1)] += _cubic(source - tap)
    return matrix


def warp(images: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Bilinear resampling of float [N, H, W, C] images at `grid` ([N or 1, H, W, 2] of (x, y)
    in [-1, 1], corners on pixel centres: PyTorch's grid_sample with align_corners=True);
    samples outside the image read zeros."""
    height, width = images.shape[1:3]
    x = (grid[..., 0] + 1) / 2 * (width - 1)
    y = (grid[..., 1] + 1) / 2 * (height - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    out = np.zeros(images.shape, np.float64)
    batch = np.arange(images.shape[0])[:, None, None]
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - np.abs(x - xi)) * (1 - np.abs(y - yi))
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            values = images[batch, np.clip(yi, 0, height - 1), np.clip(xi, 0, width - 1)]
            out += (weight * inside)[..., None] * values
    return out


@dataclasses.dataclass(frozen=True)
class WaNet(Trigger):
    """A fixed random warping field (BackdoorBench's defaults: k 4, s 0.5, grid_rescale 1).

    Attributes:
      k: the side of the random control grid the warp is upsampled from.
      s: the warp's strength.
      grid_rescale: scales the warped grid (1: none).
      cross_ratio: noise-mode samples per poisoned one (BackdoorBench: 2).
      seed: draws the warp, and each noise-mode sample's perturbation.
    """

    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0
    seed: int = 0

    def __post_init__(self):
        if self.k < 2:
            raise AttackError(f"WaNet k {self.k} must be at least 2")
        if self.s <= 0 or self.grid_rescale <= 0:
            raise AttackError(
                f"WaNet s {self.s} and grid_rescale {self.grid_rescale} must be positive"
            )
        if self.cross_ratio < 0:
            raise AttackError(f"WaNet cross_ratio {self.cross_ratio} must be >= 0")

    def validate(self, image_shape) -> None:
        height, width, _ = image_shape
        if height != width or height < self.k:
            raise AttackError(
                f"WaNet needs square images of at least k={self.k} pixels, got {height}x{width}"
            )

    @functools.lru_cache(maxsize=4)  # noqa: B019  Frozen and hashable: one grid per size.
    def grid(self, size: int) -> np.ndarray:
        """The trigger's sampling grid [1, size, size, 2] of (x, y) in [-1, 1]."""
        rng = np.random.default_rng([self.seed, 0])
        control = rng.uniform(-1.0, 1.0, (2, self.k, self.k))
        control = control / np.mean(np.abs(control))
        upsample = bicubic_matrix(self.k, size)
        noise = np.stack([upsample @ c @ upsample.T for c in control], axis=-1)
        axis = np.linspace(-1.0, 1.0, size)
        identity = np.stack(np.meshgrid(axis, axis, indexing="xy"), axis=-1)
        return np.clip((identity + self.s * noise / size) * self.grid_rescale, -1.0, 1.0)[None]

    def _warped(self, images: np.ndarray) -> np.ndarray:
        self.validate(images.shape[1:])
        return warp(images.astype(np.float64), self.grid(images.shape[1]))

    def apply(self, images: np.ndarray, indices: np.ndarray, stream: str = "train") -> np.ndarray:
        del indices, stream  # The same warp for every image.
        return np.clip(np.round(self._warped(images)), 0, 255).astype(np.uint8)

    def apply_test(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        del indices
        return self._warped(images).astype(np.float32)

    def cross_samples(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Noise-mode samples: the warp, each perturbed by its own uniform noise of up to one
        pixel (from (seed, index)), for images that keep their labels."""
        self.validate(images.shape[1:])
        size = images.shape[1]
        grids = []
        for index in indices:
            rng = np.random.default_rng([self.seed, 1, int(index)])
            grids.append(self.grid(size)[0] + rng.uniform(-1.0, 1.0, (size, size, 2)) / size)
        grid = np.clip(np.stack(grids), -1.0, 1.0)
        warped = warp(images.astype(np.float64), grid)
        return np.clip(np.round(warped), 0, 255).astype(np.uint8)
