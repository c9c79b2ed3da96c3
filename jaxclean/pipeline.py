"""The stages of an experiment, in order, and the run that walks them.

Each stage writes its outputs under WORKDIR/<stage>/ and marks itself done. `run` checks the
whole config, the devices and what the requested stages need before any work, then runs them
in order, skipping those already done with the same spec, resuming unfinished ones, and
refusing ones made from another config. `main` (launch.py's body) turns bad input, a full
disk and interrupts into one line each.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import threading
import time

import jax

from jaxclean import attacks, data, matrix, results
from jaxclean.artifacts import CorruptOutput, FinishedStage, StageConflict
from jaxclean.checks import ConfigError
from jaxclean.experiment import Experiment, log
from jaxclean.stages import (
    classifiers,
    defenses,
    diagnostics,
    generator,
    poison,
    regenerate,
    report,
)

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
        defenses.FT,
        defenses.NAD,
        defenses.ANP,
        defenses.ABL,
        classifiers.VARIATIONS_ONLY,
        classifiers.KD_ON_ORIGINAL,
        classifiers.TRUSTED_ONLY,
        classifiers.CLEAN_REFERENCE,
        report.STAGE,
    )
}
# Remade from the config in a second whenever a stage needs it, so never missing.
MADE_ON_DEMAND = ("poison",)

# Bad input and refused work: reported as one message, not a traceback.
INPUT_ERRORS = (ConfigError, data.DataError, attacks.AttackError, StageConflict)


def _names(text: str, flag: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"{flag}={text!r} names no stage; known stages: {list(STAGES)}")
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown} in {flag}; known stages: {list(STAGES)}")
    return [n for n in STAGES if n in names]


def parse_stages(text: str | None) -> list[str]:
    """'a,b' -> ['a', 'b'] in pipeline order; None or '' -> every stage."""
    if not text:
        return list(STAGES)
    return _names(text, "--stages")


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
    """Every stage's check of the config (and of each attack's run, for a matrix): needs no
    data, so a bad config fails in a second."""
    for run_config in matrix.attack_configs(config).values() or [config]:
        for stage in STAGES.values():
            stage.validate(run_config)


def _batch_sizes(config) -> dict[str, int]:
    """Every global batch the config asks for, by field."""
    sizes = {}
    recipes = {
        "teacher": config.teacher,
        "student": config.student,
        "baselines": config.baselines,
        "defenses.ft": config.defenses.ft,
        "defenses.nad.recipe": config.defenses.nad.recipe,
        "defenses.abl.isolation": config.defenses.abl.isolation,
        "defenses.abl.finetuning": config.defenses.abl.finetuning,
        "defenses.abl.unlearning": config.defenses.abl.unlearning,
        "diagnostics.learnability": config.diagnostics.learnability,
        "diagnostics.detectability": config.diagnostics.detectability,
    }
    if generator.registry.get(config.generator.name).trains_here:
        recipes["generator.encoder"] = config.generator.encoder
        sizes["generator.vae.batch_size"] = config.generator.vae.batch_size
        sizes["generator.unet.batch_size"] = config.generator.unet.batch_size
        sizes["generator.encode_batch_size"] = config.generator.encode_batch_size
    for name, recipe in recipes.items():
        sizes[f"{name}.batch_size"] = recipe.batch_size
        sizes[f"{name}.eval_batch_size"] = recipe.eval_batch_size
    sizes["defenses.anp.batch_size"] = config.defenses.anp.batch_size
    return sizes


def check_devices(config) -> None:
    """Every batch must split evenly over the devices, which are known only now."""
    devices = jax.device_count()
    bad = [f"{field} {size}" for field, size in _batch_sizes(config).items() if size % devices]
    if bad:
        raise ConfigError(
            f"{', '.join(bad)}: not divisible by the {devices} devices; set them to multiples "
            f"of {devices}, or run on a device count that divides them (--cpu_devices)"
        )


def _needs_closure(config, name: str) -> list[str]:
    wanted, todo = [], list(STAGES[name].needs(config))
    while todo:
        need = todo.pop()
        if need not in wanted:
            wanted.append(need)
            todo += STAGES[need].needs(config)
    return [n for n in STAGES if n in wanted]


def dependents(config, name: str) -> list[str]:
    """The stages that read `name`'s outputs, directly or through another stage."""
    return [other for other in STAGES if name in _needs_closure(config, other)]


def missing_upstream(
    config, workdir: str, names: list[str], cleared: frozenset = frozenset()
) -> dict[str, list[str]]:
    """For each requested stage, the stages it needs that are neither finished in the workdir
    (and not about to be cleared) nor requested before it, and, through those, what they
    need in turn (a finished stage's own inputs are not asked for again)."""
    finished = {
        name
        for name, stage in STAGES.items()
        if name not in cleared
        and FinishedStage.exists(os.path.join(workdir, stage.record_directory(config)))
    }
    missing = {}
    for position, name in enumerate(names):
        available = finished | set(names[:position]) | set(MADE_ON_DEMAND)
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


def check_upstream(config, workdir: str, names: list[str], cleared=frozenset()) -> None:
    """One line naming every missing upstream stage and the --stages= that makes them."""
    missing = missing_upstream(config, workdir, names, frozenset(cleared))
    if missing:
        needed = {n for ns in missing.values() for n in ns} | set(names)
        stages = ",".join(n for n in STAGES if n in needed)
        what = "; ".join(f"{name} needs {', '.join(needs)}" for name, needs in missing.items())
        raise ConfigError(f"{what}, not finished in {workdir}: run --stages={stages}")
    if names == ["report"] and not os.path.exists(results.results_path(workdir)):
        raise ConfigError(
            f"nothing to report in {workdir}: no model or diagnostic has finished there; run "
            "the stages first (e.g. --stages=poison,teacher,report)"
        )


def redo_set(config, redo: str) -> list[str]:
    """The stages --redo clears: those named, and every stage that reads them."""
    if not redo:
        return []
    named = _names(redo, "--redo")
    cleared = set(named)
    for name in named:
        cleared.update(dependents(config, name))
    return [n for n in STAGES if n in cleared]


def clear(config, workdir: str, names: list[str]) -> None:
    """Removes the outputs and results.json entries of stages being redone, saying which."""
    for name in names:
        stage = STAGES[name]
        for relative in stage.output_paths(config):
            path = os.path.join(workdir, relative)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
            else:
                continue
            log(f"redo: removed {path}")
        if os.path.exists(results.results_path(workdir)):
            for key in results.forget(workdir, stage.result_prefixes(config)):
                log(f"redo: removed {key} from {results.results_path(workdir)}")


def run(config, workdir: str, stages: str | None = None, redo: str = "") -> dict:
    """Runs the requested stages in order and returns the results.

    Args:
      config: the experiment's ConfigDict.
      workdir: where every output goes.
      stages: comma-separated stage names; all stages when empty.
      redo: comma-separated stages to clear first, with every stage that reads them.
    """
    names = parse_stages(stages)
    validate_config(config)
    check_devices(config)
    check_workdir(workdir)
    cleared = redo_set(config, redo)
    check_upstream(config, workdir, names, cleared)
    exp = Experiment(config, workdir)
    # Data-dependent checks (target in range, trigger fits) before any training starts.
    if config.attack.name != "none" and any(n != "report" for n in names):
        attacks.validate_for_data(config.attack, exp.splits.train)
    if cleared:
        log(f"redo: clearing {', '.join(cleared)} (--redo={redo} and the stages that read it)")
        clear(config, workdir, cleared)
    os.makedirs(workdir, exist_ok=True)
    timings = {}
    for name in names:
        started = time.perf_counter()
        try:
            STAGES[name].run(exp)
        except CorruptOutput as e:
            raise e.of_stage(name) from None
        timings[name] = round(time.perf_counter() - started, 1)
    exp.writer.close()
    log("stage wall seconds: " + ", ".join(f"{k}={v}" for k, v in timings.items()))
    return results.read(workdir)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; raised in the main thread by the signal handler."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    del frame
    raise Interrupted(signum)


def _exit(message: str, status: int) -> None:
    """One line on stderr, then out at once: no interpreter teardown (XLA's threads have
    crashed it at exit after an interrupt), no half-written file (every write is atomic)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


def _disk_full(error: BaseException) -> bool:
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
        "No space left on device" in str(error)
    )


def main(config, workdir: str, stages: str | None, redo: str = "", command: str = "") -> None:
    """launch.py's body: runs, then prints the table.

    Bad input exits with status 2 and one line; SIGINT and SIGTERM with 130 and 143 (finished
    work kept, a rerun resumes); a full disk with 1, naming the path.
    """
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _raise_interrupted)
    command = command or "the same command"
    try:
        if config.matrix.attacks:
            validate_config(config)  # Every attack's run, before the first starts.
            matrix.run(config, workdir, stages, lambda c, w, s: run(c, w, s, redo))
            return
        found = run(config, workdir, stages, redo)
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        _exit(
            # On a line of its own: a progress bar may have left the cursor mid-line.
            f"\ninterrupted by {name}: every finished stage, checkpoint and shard is kept; rerun "
            "the same command to resume",
            128 + e.signum,
        )
    except CorruptOutput as e:
        _exit(f"error: {e}: redo that stage with: {command} --redo={e.stage}", 2)
    except INPUT_ERRORS as e:
        _exit(f"error: {e}", 2)
    except Exception as e:
        if not _disk_full(e):
            raise
        path = getattr(e, "filename", None) or "the workdir"
        _exit(
            f"error: no space left on the device writing {path}: free some space, then rerun "
            "the same command to resume",
            1,
        )
    log("\n" + results.summary_table(found))
    log(f"results: {results.results_path(workdir)}")
