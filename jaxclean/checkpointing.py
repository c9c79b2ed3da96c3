"""Orbax checkpoints: training state that resumes, and final weights that later stages load;
and safetensors, the one-file format weights are exported and shipped in.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest: a rerun resumes from there.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxclean import faults
from jaxclean.artifacts import CorruptOutput


class Checkpointer:
    """A CheckpointManager of {step, params, batch_stats, opt_state} trees."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self._directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, tree: dict) -> None:
        faults.disk_full_point(os.path.join(self._directory, str(step)))
        self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)

    def restore(self, step: int, like: dict) -> dict:
        """Restores `step` into arrays of the same shapes, dtypes and shardings as `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # Orbax and tensorstore raise many types for a damaged step.
            path = os.path.join(self._directory, str(step))
            raise CorruptOutput(path, f"checkpoint of step {step}: {_first_line(e)}") from None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def save_tree(path: str, tree) -> None:
    """Saves a pytree of arrays (e.g. final variables) to `path`, atomically."""
    path = os.path.abspath(path)
    faults.disk_full_point(path)
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
    except Exception as e:  # Orbax and tensorstore raise many types for damaged files.
        raise CorruptOutput(path, f"saved weights: {_first_line(e)}") from None
    finally:
        checkpointer.close()


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


# Separates the levels of a nested parameter tree in a safetensors key: "vae/encoder/...".
_KEY_SEPARATOR = "/"


def to_safetensors(tree) -> bytes:
    """A nested dict of arrays as the bytes of one safetensors file (keys joined by "/").

    safetensors stores a 0-d array as shape (1,); their keys go in the file's metadata, so
    `from_safetensors` gives back the shapes it was given.
    """
    from safetensors.numpy import save

    flat = {key: np.asarray(value) for key, value in flatten_dict(tree, sep=_KEY_SEPARATOR).items()}
    scalars = sorted(key for key, value in flat.items() if value.ndim == 0)
    tensors = {key: np.ascontiguousarray(value) for key, value in flat.items()}
    return save(tensors, metadata={"scalar_keys": json.dumps(scalars)})


def from_safetensors(blob: bytes) -> dict:
    """The nested dict of numpy arrays `to_safetensors` wrote."""
    from safetensors.numpy import load

    header_size = int.from_bytes(blob[:8], "little")
    metadata = json.loads(blob[8 : 8 + header_size]).get("__metadata__", {})
    scalars = set(json.loads(metadata.get("scalar_keys", "[]")))
    flat = {
        key: value.reshape(()) if key in scalars else value for key, value in load(blob).items()
    }
    return unflatten_dict(flat, sep=_KEY_SEPARATOR)
