"""Stage `report`: DER against the teacher, report/results.md and report/metrics.png.

The figures are already in report/results.json (each stage adds its own as it finishes);
launch.py prints the table after the last stage.
"""

from __future__ import annotations

from jaxclean import results
from jaxclean.checks import ConfigError
from jaxclean.experiment import Experiment, Stage


def run(exp: Experiment) -> None:
    found = results.read(exp.workdir)
    if not found["models"] and not found["diagnostics"]:
        raise ConfigError(
            f"nothing to report in {exp.workdir}: no model or diagnostic has finished there; "
            "run the stages first (e.g. --stages=poison,teacher,report)"
        )
    if exp.is_writer:
        results.finalize(exp.workdir)


STAGE = Stage(
    "report",
    "DER against the teacher, results.md and metrics.png",
    run,
    # Nothing of its own to clear: it rewrites its views of results.json each time.
    outputs=lambda config: (),
    result_keys=lambda config: (),
)
