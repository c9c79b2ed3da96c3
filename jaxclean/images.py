"""Image grids as PNG files, for looking at what the generators make."""

from __future__ import annotations

import io

import numpy as np

from jaxclean.artifacts import atomic_write_bytes


def grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Tiles rows of uint8 [N, H, W, C] images (equal N, H, W, C) into one uint8 image."""
    num, height, width, channels = rows[0].shape
    out = np.full(
        (len(rows) * (height + pad) + pad, num * (width + pad) + pad, channels), 128, np.uint8
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            out[top : top + height, left : left + width] = image
    return out


def save_png(path: str, image: np.ndarray, scale: int = 3) -> None:
    """Writes a uint8 [H, W, C] image, enlarged `scale` times so small images are visible."""
    from PIL import Image

    image = np.repeat(np.repeat(image, scale, 0), scale, 1)
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
