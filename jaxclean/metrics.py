"""One metric writer for the project, in the shape of clu's MetricWriter, and progress bars.

Only process 0 writes or shows anything; other processes get no-ops, so callers never check.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from tqdm import tqdm


class MetricWriter:
    """Scalars and images to TensorBoard event files (tensorboardX: no TensorFlow needed).

    The event file is opened at the first write, so a run refused before any work leaves no
    trace in its workdir.
    """

    def __init__(self, logdir: str):
        self._logdir = logdir
        self._writer = None
        self._active = jax.process_index() == 0

    def _open(self):
        if self._writer is None and self._active:
            from tensorboardX import SummaryWriter

            os.makedirs(self._logdir, exist_ok=True)
            self._writer = SummaryWriter(self._logdir)
        return self._writer

    def write_scalars(self, step: int, scalars: dict) -> None:
        writer = self._open()
        if writer is None:
            return
        for key, value in scalars.items():
            writer.add_scalar(key, float(value), int(step))

    def write_images(self, step: int, images: dict) -> None:
        """images: key -> uint8 [H, W, C] or [N, H, W, C] arrays."""
        writer = self._open()
        if writer is None:
            return
        for key, value in images.items():
            value = np.asarray(value)
            if value.ndim == 4:
                writer.add_images(key, value, int(step), dataformats="NHWC")
            else:
                writer.add_image(key, value, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def progress(total: int, desc: str, initial: int = 0, unit: str = "step"):
    """A tqdm bar on process 0 only."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
        mininterval=2.0,
    )
