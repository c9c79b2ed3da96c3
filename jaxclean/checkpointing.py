"""Orbax checkpoints: training state that resumes, and final weights that later stages load.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest: a rerun resumes from there.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A CheckpointManager of {step, params, batch_stats, opt_state} trees."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, tree: dict) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)

    def restore(self, step: int, like: dict) -> dict:
        """Restores `step` into arrays of the same shapes, dtypes and shardings as `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def save_tree(path: str, tree) -> None:
    """Saves a pytree of arrays (e.g. final variables) to `path`, atomically."""
    path = os.path.abspath(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()


def load_tree(path: str, like=None):
    """Loads a pytree saved by `save_tree`; into `like`'s shapes and shardings when given."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no saved weights at {path}")
    checkpointer = ocp.StandardCheckpointer()
    try:
        if like is None:
            return checkpointer.restore(path)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return checkpointer.restore(path, abstract)
    finally:
        checkpointer.close()
