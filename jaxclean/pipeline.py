"""The stages of an experiment, in order, and the run that walks them.

Each stage writes its outputs under WORKDIR/<stage>/ and marks itself done; `run` validates the
whole config and what the requested stages need before any work, then runs them in order,
skipping those already done with the same spec, resuming unfinished ones, and refusing ones made
from another config.
"""

from __future__ import annotations

import os
import sys
import time

from jaxclean import attacks, data, results
from jaxclean.artifacts import FinishedStage, StageConflict
from jaxclean.checks import ConfigError
from jaxclean.experiment import Experiment, log
from jaxclean.stages import classifiers, diagnostics, generator, poison, regenerate, report

STAGES = {
    stage.name: stage
    for stage in (
        poison.STAGE,
        classifiers.TEACHER,
        generator.ENCODER,
        generator.GENERATOR,
        regenerate.STAGE,
        diagnostics.STAGE,
        classifiers.STUDENT,
        classifiers.VARIATIONS_ONLY,
        classifiers.KD_ON_ORIGINAL,
        classifiers.TRUSTED_ONLY,
        classifiers.CLEAN_REFERENCE,
        report.STAGE,
    )
}

# Bad input and refused work: reported as one message, not a traceback.
INPUT_ERRORS = (ConfigError, data.DataError, attacks.AttackError, StageConflict)


def parse_stages(text: str | None) -> list[str]:
    """'a,b' -> ['a', 'b'] in pipeline order; None or '' -> every stage."""
    if text is None or not text.strip():
        return list(STAGES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"--stages={text!r} names no stage; known stages: {list(STAGES)}")
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; known stages: {list(STAGES)}")
    return [n for n in STAGES if n in names]


def check_workdir(workdir: str) -> None:
    """Fails when the workdir cannot be made or written; creates nothing."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"workdir {workdir!r} is a file, not a directory: pass another --workdir")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(
            f"workdir {workdir!r} is not writable: {existing} is a file, not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir!r} is not writable: no write permission on {existing}")


def validate_config(config) -> None:
    """Every stage's check of the config: needs no data, so a bad config fails in a second."""
    for stage in STAGES.values():
        stage.validate(config)


def missing_upstream(config, workdir: str, names: list[str]) -> dict[str, list[str]]:
    """For each requested stage, the stages it needs (directly or through another) that are
    neither finished in the workdir nor requested before it."""
    finished = {
        name
        for name, stage in STAGES.items()
        if FinishedStage.exists(os.path.join(workdir, stage.record_directory(config)))
    }
    missing = {}
    for position, name in enumerate(names):
        available = finished | set(names[:position])
        wanted, todo = [], list(STAGES[name].needs(config))
        while todo:
            need = todo.pop()
            if need in available or need in wanted:
                continue
            wanted.append(need)
            todo += STAGES[need].needs(config)
        if wanted:
            missing[name] = [n for n in STAGES if n in wanted]
    return missing


def check_upstream(config, workdir: str, names: list[str]) -> None:
    """One line naming every missing upstream stage and the --stages= that makes them."""
    missing = missing_upstream(config, workdir, names)
    if not missing:
        return
    needed = sorted({n for ns in missing.values() for n in ns} | set(names), key=list(STAGES).index)
    what = "; ".join(f"{name} needs {', '.join(needs)}" for name, needs in missing.items())
    raise ConfigError(f"{what}, not finished in {workdir}: run --stages={','.join(needed)}")


def run(config, workdir: str, stages: str | None = None) -> dict:
    """Runs the requested stages in order and returns the results.

    Args:
      config: the experiment's ConfigDict.
      workdir: where every output goes.
      stages: comma-separated stage names; all stages when empty.
    """
    names = parse_stages(stages)
    validate_config(config)
    check_workdir(workdir)
    check_upstream(config, workdir, names)
    exp = Experiment(config, workdir)
    # Data-dependent checks (target in range, trigger fits) before any training starts.
    if config.attack.name != "none" and any(n != "report" for n in names):
        attacks.validate_for_data(config.attack, exp.splits.train)
    os.makedirs(workdir, exist_ok=True)
    timings = {}
    for name in names:
        started = time.perf_counter()
        STAGES[name].run(exp)
        timings[name] = round(time.perf_counter() - started, 1)
    exp.writer.close()
    log("stage wall seconds: " + ", ".join(f"{k}={v}" for k, v in timings.items()))
    return results.read(workdir)


def main(config, workdir: str, stages: str | None) -> None:
    """launch.py's body: runs, then prints the table; bad input exits with its message."""
    try:
        found = run(config, workdir, stages)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from e
    log("\n" + results.summary_table(found))
    log(f"results: {results.results_path(workdir)}")
