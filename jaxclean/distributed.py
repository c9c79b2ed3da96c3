"""Multi-process start-up: explicit coordinator flags, or the platform's own discovery."""

from __future__ import annotations

import jax


def initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    auto: bool = False,
) -> None:
    """Joins a multi-process run when asked to; a single process needs nothing.

    Args:
      coordinator_address: host:port of process 0; with num_processes and process_id.
      num_processes: how many processes take part.
      process_id: this one's index.
      auto: let jax.distributed.initialize() discover everything (TPU pods, SLURM).
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together")
        # CPU processes need gloo for cross-process collectives; the setting only affects the
        # CPU backend, so it is harmless on GPU and TPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif auto:
        jax.distributed.initialize()
