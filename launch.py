"""Runs a jaxclean experiment: parses flags, then hands over to jaxclean.pipeline.run.

  python launch.py --config configs/fashion_mnist_badnets.py --workdir runs/badnets \
      [--stages=teacher,report] [--config.teacher.num_epochs=5]

Rerunning the same command resumes: finished stages are skipped, unfinished ones continue
from their last checkpoint.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every output of the run goes.")
_STAGES = flags.DEFINE_string("stages", "", "Comma-separated stages to run; empty: all.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() and let the platform (TPU, SLURM) "
    "supply the coordinator and process ids.",
)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices",
    0,
    "On a machine without accelerators, split the CPU into this many JAX devices. XLA:CPU keeps "
    "one stream per device busier than it spreads one over several cores: on 2-core machines, 2 "
    "gave 1.35x the training and 1.8x the sampling throughput. 0 leaves JAX's default.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CPU_DEVICES.value:
        # Must be set before JAX initialises its backends, i.e. before jaxclean is imported.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}"
        )
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every save at INFO; keep the console to progress bars and results.
        logging.set_verbosity(logging.WARNING)
    from jaxclean import distributed, pipeline

    distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value
    )
    pipeline.main(_CONFIG.value, _WORKDIR.value, _STAGES.value)


if __name__ == "__main__":
    app.run(main)
