"""Device mesh and batch placement: one data-parallel axis over every device of every process."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named "data" over all devices of all processes (or over `devices`).

    Auto axis types: jit propagates the batch sharding through every op, as data parallelism
    needs. (jax.make_mesh defaults to Explicit types since 0.7, which would make every op's
    sharding part of its type and reject, e.g., a gather from an unsharded table.)
    """
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


def local_mesh() -> Mesh:
    """A mesh over this process's devices only, for work that needs no other process."""
    return make_mesh(jax.local_devices())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the mesh: batches."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device: parameters and optimizer state."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, what: str = "batch") -> None:
    """Every device must get the same number of rows of a global batch."""
    devices = jax.device_count()
    if global_batch_size % devices:
        raise ValueError(
            f"{what} size {global_batch_size} is not divisible by the {devices} devices"
        )


def process_rows(global_batch_size: int) -> slice:
    """The rows of a global batch that this process loads and feeds."""
    per_process = global_batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def to_global(local_batch: dict, mesh: Mesh) -> dict:
    """Assembles per-process numpy rows into global arrays sharded along "data".

    Args:
      local_batch: this process's rows of every field (see `process_rows`).
      mesh: the mesh from `make_mesh`.
    """
    sharding = data_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in local_batch.items()
    }


def to_host(array: jax.Array) -> np.ndarray:
    """Gathers a (possibly multi-process) global array to every host as numpy."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def barrier(name: str) -> None:
    """Waits for every process (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
