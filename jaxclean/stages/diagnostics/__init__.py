"""Stage `diagnostics`: what the variations carry of the trigger, and of the content.

  teacher_measures  the teacher on variations of test images: content kept, artefacts that
                    activate the backdoor, the trigger surviving regeneration
  learnability      can a classifier learn the trigger from the variations and their poisoned
                    labels, against references without any trigger
  detectability     can a detector tell a triggered source's variation from its clean twin's

Each classifier it trains is a resumable stage of its own under WORKDIR/learnability/ and
WORKDIR/detectability/; the figures go to results.json's "diagnostics", prefixed with the
regeneration's name.
"""

from __future__ import annotations

from jaxclean import checks, results
from jaxclean.checks import ConfigError
from jaxclean.experiment import Experiment, Stage, log
from jaxclean.stages import regenerate
from jaxclean.stages.classifier_stage import load_classifier
from jaxclean.stages.diagnostics import detectability, learnability, teacher_measures


def validate(config) -> None:
    diagnostics = config.diagnostics
    checks.positive(diagnostics.test_size, "diagnostics.test_size")
    checks.recipe(diagnostics.learnability, "diagnostics.learnability")
    checks.recipe(diagnostics.detectability, "diagnostics.detectability")
    held_out = diagnostics.detectability_held_out
    if not 0.0 < held_out < 1.0:
        raise ConfigError(f"diagnostics.detectability_held_out {held_out} must be in (0, 1)")
    seeds = diagnostics.learnability_seeds
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"diagnostics.learnability_seeds must be an integer >= 1, got {seeds!r}")


def run(exp: Experiment) -> None:
    """Measures what the variations carry: trigger, content, artefacts."""
    if exp.config.attack.name == "none":
        log("diagnostics: no attack configured; nothing to measure")
        return
    name = exp.config.regenerate.name
    regenerate.finished(exp)
    teacher_model, teacher_vars = load_classifier(
        exp, "teacher", exp.config.teacher, exp.splits.train.num_classes
    )
    detector_split = detectability.detector_split(exp)  # Before the minutes of training below.
    figures = {}
    figures.update(teacher_measures.measure(exp, teacher_model, teacher_vars))
    variations = regenerate.load_variations(exp)
    figures.update(learnability.trigger_learnability(exp, variations))
    figures.update(detectability.trigger_detectability(exp, variations, detector_split))
    if exp.is_writer:
        results.update(exp.workdir, diagnostics={f"{name}/{k}": v for k, v in figures.items()})
    for key, value in figures.items():
        log(f"diagnostics {name}: {key} = {value}")


def _needs(config) -> tuple[str, ...]:
    return () if config.attack.name == "none" else ("poison", "teacher", "regenerate")


# The families of figures the stage writes, under the regeneration's name.
FAMILIES = (
    "content_kept",
    "artefact_activation",
    "trigger_survival",
    "trigger_learnability",
    "trigger_detectability",
    "test_subset_size",
    "triggered_subset_size",
)


def _outputs(config) -> tuple[str, ...]:
    cached = regenerate.directory(config)
    return (
        "learnability",
        "detectability",
        f"{cached}/test_variations.npz",
        f"{cached}/clean_twins.npz",
    )


def _result_keys(config) -> tuple[str, ...]:
    name = config.regenerate.name
    return ("diagnostics/learnability/", *(f"diagnostics/{name}/{f}" for f in FAMILIES))


STAGE = Stage(
    "diagnostics",
    "what the variations carry: trigger learnability and detectability, trigger survival, "
    "content kept, artefact activation",
    run,
    needs=_needs,
    validate=validate,
    outputs=_outputs,
    result_keys=_result_keys,
)
