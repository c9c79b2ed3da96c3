"""The stages of an experiment, in order, and the run that walks them.

A stage is a function of the Experiment that writes its outputs under WORKDIR/<stage>/ and
marks itself done; `run` skips stages already done with the same spec, resumes unfinished ones,
and refuses ones made from another config.
"""

from __future__ import annotations

import os
import tempfile
import time

from jaxclean import attacks, data, defense, generation, report
from jaxclean.artifacts import StageConflict
from jaxclean.experiment import (
    ConfigError,
    Experiment,
    Stage,
    log,
    poison_stage,
    validate_recipe,
)


def report_stage(exp: Experiment) -> None:
    """Adds DER, writes report/results.md and report/metrics.png (launch.py prints the table)."""
    if exp.is_writer:
        report.finalize(exp.workdir)


STAGES = {
    stage.name: stage
    for stage in (
        Stage("poison", poison_stage, "poison the training set and record the plan"),
        Stage("teacher", defense.teacher_stage, "train the teacher on the poisoned set"),
        Stage("encoder", generation.encoder_stage, "train the generator's semantic encoder"),
        Stage("generator", generation.generator_stage, "train the image-variation generator"),
        Stage("regenerate", generation.regenerate_stage, "a variation of every training image"),
        Stage("diagnostics", generation.diagnostics_stage, "what the variations carry"),
        Stage("student", defense.student_stage, "distill the teacher on the variations"),
        Stage("variations_only", defense.variations_only_stage, "CE on the variations"),
        Stage("kd_on_original", defense.kd_on_original_stage, "distill on the originals"),
        Stage("trusted_only", defense.trusted_only_stage, "CE on the trusted split alone"),
        Stage("clean_reference", defense.clean_reference_stage, "CE on unpoisoned train"),
        Stage("report", report_stage, "write report/results.md"),
    )
}


def parse_stages(text: str | None) -> list[str]:
    """'a,b' -> ['a', 'b'] in pipeline order; None or '' -> every stage."""
    if not text:
        return list(STAGES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; known stages: {list(STAGES)}")
    return [n for n in STAGES if n in names]


def check_workdir(workdir: str) -> None:
    """Fails before any work when the workdir cannot be written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} is not writable: {e}") from e


def validate_config(config) -> None:
    """Checks that need no data, so a bad config fails in a second, not after a load."""
    if config.attack.name != "none":
        if config.attack.name not in attacks.ATTACKS:
            raise attacks.AttackError(
                f"unknown attack {config.attack.name!r}; known: {sorted(attacks.ATTACKS)} or none"
            )
        if not 0.0 <= config.attack.rate <= 1.0:
            raise attacks.AttackError(f"poisoning rate {config.attack.rate} must be in [0, 1]")
        attacks.make_trigger(config.attack)
    validate_recipe(config.teacher, "teacher")
    validate_recipe(config.student, "student")
    defense.validate_distillation(config.student)
    if config.student.get("teacher_prior_correction", False) and not config.data.trusted_size:
        raise ConfigError(
            "student.teacher_prior_correction takes the clean label prior from the trusted "
            "split, and data.trusted_size is 0"
        )
    generation.validate_config(config)


def run(config, workdir: str, stages: str | None = None) -> dict:
    """Runs the requested stages in order and returns the results.

    Args:
      config: the experiment's ConfigDict.
      workdir: where every output goes.
      stages: comma-separated stage names; all stages when empty.
    """
    names = parse_stages(stages)
    check_workdir(workdir)
    validate_config(config)
    exp = Experiment(config, workdir)
    # Data-dependent checks (target in range, trigger fits) before any training starts.
    if config.attack.name != "none" and any(n != "report" for n in names):
        attacks.validate_attack_config(config.attack, exp.splits.train.num_classes)
        attacks.make_trigger(config.attack).validate(exp.splits.train.image_shape)
    timings = {}
    for name in names:
        started = time.perf_counter()
        STAGES[name].run(exp)
        timings[name] = round(time.perf_counter() - started, 1)
    exp.writer.close()
    log("stage wall seconds: " + ", ".join(f"{k}={v}" for k, v in timings.items()))
    return report.read_results(workdir)


# Bad input and refused work: reported as one message, not a traceback.
INPUT_ERRORS = (ConfigError, data.DataError, attacks.AttackError, StageConflict)


def main(config, workdir: str, stages: str | None) -> None:
    """launch.py's body: runs, then prints the table; bad input exits with its message."""
    import sys

    try:
        results = run(config, workdir, stages)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from e
    log("\n" + report.summary_table(results))
    log(f"results: {report.results_path(workdir)}")
