"""Runs a jaxclean experiment: parses flags, then hands over to jaxclean.pipeline.main.

  python launch.py --config configs/fashion_mnist_badnets.py --workdir runs/badnets \
      [--stages=teacher,report] [--redo=teacher] [--config.teacher.num_epochs=5]

Rerunning the same command resumes: finished stages are skipped, unfinished ones continue
from their last checkpoint.
"""

import os
import re
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every output of the run goes.")
_STAGES = flags.DEFINE_string("stages", "", "Comma-separated stages to run; empty: all.")
_REDO = flags.DEFINE_string(
    "redo", "", "Comma-separated stages to clear first, with every stage that reads them."
)
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


def _parse_flags(argv):
    """absl's parsing, with a bad --config override (an unknown field, a value of the wrong
    type, a config file that fails) as one line rather than a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _refuse(str(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        text = str(e).strip().strip("'\"").replace("\\n", "\n").replace("\\'", "'")
        hint = re.search(r"Did you mean \"?([\w.]+)\"? instead", text)
        field = re.search(r"'([\w.]+)'", text)
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        named = [a for a in overrides if field and field.group(1) in a]
        if not named:
            _refuse(f"the --config file cannot be loaded: {text.splitlines()[0]}")
        which = named[0].split("=")[0]
        if hint:
            _refuse(f"{which} names no config field: did you mean {hint.group(1)}?")
        _refuse(f"{which} cannot be applied: {text.splitlines()[0]}")


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        _refuse(f"unexpected arguments {argv[1:]}: every option is a --flag (launch.py --help)")
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
    command = "python " + shlex.join(a for a in sys.argv if not a.startswith("--redo"))
    pipeline.main(_CONFIG.value, _WORKDIR.value, _STAGES.value, _REDO.value, command)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
