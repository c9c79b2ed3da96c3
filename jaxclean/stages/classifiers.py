"""The classifiers of the method and its baselines, each a stage.

  teacher          cross-entropy on the poisoned training set (no defense)
  student          the method: distillation from the teacher on the variations (and, with
                   student.include_trusted, the trusted split's own images)
  kd_on_original   the same distillation on the poisoned originals: is it regeneration, or
                   distillation, that removes the backdoor?
  variations_only  cross-entropy on the variations, no teacher
  trusted_only     cross-entropy on the trusted split alone: why not just use the clean data?
  clean_reference  cross-entropy on the training images without poison: the best a defense
                   can hope for, and the ASR floor

The distilled models train with config.student, the cross-entropy baselines with
config.baselines, the teacher with config.teacher; all are evaluated alike.
"""

from __future__ import annotations

import functools

import jax

from jaxclean import checks, sharding, steps
from jaxclean.artifacts import FinishedStage, differences, versioned
from jaxclean.checks import ConfigError
from jaxclean.data import ImageDataset
from jaxclean.experiment import Experiment, Stage
from jaxclean.stages import regenerate
from jaxclean.stages.classifier_stage import load_classifier, train_classifier
from jaxclean.stages.poison import require_poison_plan

# The fields of config.student that distillation reads beside the classifier recipe.
DISTILLATION_FIELDS = (
    "alpha",
    "temperature",
    "student_corruption",
    "include_trusted",
    "teacher_prior_correction",
    "seed_offset",
)


def validate_teacher(config) -> None:
    checks.recipe(config.teacher, "teacher")


def validate_student(config) -> None:
    recipe = config.student
    checks.recipe(recipe, "student")
    checks.probability(recipe.alpha, "student.alpha")
    if recipe.temperature <= 0:
        raise ConfigError(f"student.temperature {recipe.temperature} must be > 0")
    checks.probability(recipe.student_corruption, "student.student_corruption")
    checks.non_negative_int(recipe.seed_offset, "student.seed_offset")
    if recipe.include_trusted and recipe.select == "best":
        raise ConfigError(
            "student.include_trusted trains on the trusted split, which student.select='best' "
            "selects the weights on: use select='last'"
        )
    if recipe.teacher_prior_correction and not config.data.trusted_size:
        raise ConfigError(
            "student.teacher_prior_correction takes the clean label prior from the trusted "
            "split, and data.trusted_size is 0: set data.trusted_size, or turn the correction off"
        )


def validate_baselines(config) -> None:
    checks.recipe(config.baselines, "baselines")


# ----------------------------------------------------------------------------- teacher


def run_teacher(exp: Experiment) -> None:
    """Trains the (possibly backdoored) teacher on the poisoned training set, as is."""
    require_poison_plan(exp)
    spec = {
        **exp.poison_spec(),
        "teacher": exp.config.teacher,
        "poisoned_fingerprint": exp.plan.poisoned_fingerprint,
    }
    train_classifier(exp, "teacher", exp.poisoned_train, exp.config.teacher, spec)


# ----------------------------------------------------------------------------- distilled


def _teacher(exp: Experiment):
    model, variables = load_classifier(
        exp, "teacher", exp.config.teacher, exp.splits.train.num_classes
    )
    # Placed once, replicated, rather than copied to the devices at every step.
    return model, jax.device_put(variables, sharding.replicated(exp.mesh))


def _distilled(exp: Experiment, name: str, dataset: ImageDataset, spec: dict) -> None:
    recipe = exp.config.student
    teacher_record = exp.upstream("teacher")
    if recipe.include_trusted:
        # The defender's own clean images, the ones the generator learnt from: real images
        # beside the variations narrow the gap between what the student trains on and what it
        # is tested on. The teacher labels them like the rest.
        dataset = dataset.concatenate(exp.splits.trusted)
    teacher_model, teacher_variables = _teacher(exp)
    offset = None
    if recipe.teacher_prior_correction:
        offset = steps.teacher_prior_correction(
            exp.poisoned_train.labels, exp.splits.trusted.labels, exp.splits.train.num_classes
        )
    make_step = lambda model, augment: functools.partial(  # noqa: E731
        steps.distill_step,
        teacher_apply=teacher_model.apply,
        augment=augment,
        alpha=recipe.alpha,
        temperature=recipe.temperature,
        student_corruption=recipe.student_corruption,
        teacher_logit_offset=offset,
    )
    spec = {**spec, "student": recipe, "teacher": teacher_record.spec_fingerprint}
    train_classifier(
        exp,
        name,
        dataset,
        recipe,
        spec,
        make_step=make_step,
        extra_args=(teacher_variables,),
        # A repeat under another initialisation and data order; the data split, poison and
        # variations stay those of config.seed.
        seed=exp.config.seed + recipe.seed_offset,
    )


def run_student(exp: Experiment) -> None:
    """The method: distill the teacher into a fresh classifier on the variations."""
    require_poison_plan(exp)
    exp.upstream("teacher")
    variations, fingerprint = regenerate.finished_variations(exp)
    _distilled(exp, "student", variations, {**exp.poison_spec(), "variations": fingerprint})


def run_kd_on_original(exp: Experiment) -> None:
    """Baseline: the same distillation on the poisoned originals, no regeneration."""
    require_poison_plan(exp)
    spec = {**exp.poison_spec(), "poisoned_fingerprint": exp.plan.poisoned_fingerprint}
    _distilled(exp, "kd_on_original", exp.poisoned_train, spec)


# ----------------------------------------------------------------------------- cross-entropy


def run_variations_only(exp: Experiment) -> None:
    """Baseline: cross-entropy on the variations with their (poisoned) labels, no teacher."""
    require_poison_plan(exp)
    variations, fingerprint = regenerate.finished_variations(exp)
    spec = {**exp.poison_spec(), "baselines": exp.config.baselines, "variations": fingerprint}
    train_classifier(exp, "variations_only", variations, exp.config.baselines, spec)


def run_trusted_only(exp: Experiment) -> None:
    """Baseline: a classifier trained on the trusted split alone."""
    _attack_free_classifier(exp, "trusted_only", exp.splits.trusted)


def run_clean_reference(exp: Experiment) -> None:
    """Reference: the same training images without poison; the floor for ASR."""
    _attack_free_classifier(exp, "clean_reference", exp.splits.train)


def _attack_free_classifier(exp: Experiment, name: str, dataset: ImageDataset) -> None:
    """A classifier that sees no poisoned image: the attack only enters its evaluation.

    So two runs on the same data with different attacks train the same model, and with
    config.reuse_attack_free_from (the other run's workdir) the second adopts the first's
    weights and only evaluates them against its own attack.
    """
    training = {**exp.data_spec(), "baselines": exp.config.baselines}
    spec = {**training, "attack_for_eval": exp.config.attack}
    source = exp.config.reuse_attack_free_from
    done_here = exp.record(name, spec).is_done()
    adopt = _adoptable_stage(source, name, training) if source and not done_here else ""
    train_classifier(exp, name, dataset, exp.config.baselines, spec, adopt_from=adopt)


def _adoptable_stage(source: str, name: str, training: dict) -> str:
    """`source`'s finished `name` stage, refused unless it was trained as `training` says."""
    theirs = FinishedStage.read(
        f"{source}/{name}",
        f"reuse_attack_free_from: no finished {name} in {source}; run it there first, or "
        "leave reuse_attack_free_from empty to train it here",
    )
    spec = {k: v for k, v in theirs.spec.items() if k != "attack_for_eval"}
    changes = differences(spec, versioned(training))
    if changes:
        raise ConfigError(
            f"reuse_attack_free_from: {theirs.directory} was trained otherwise than this run's "
            f"{name} ({'; '.join(changes[:8])})"
        )
    return theirs.directory


TEACHER = Stage(
    "teacher",
    "cross-entropy on the poisoned set (no defense)",
    run_teacher,
    needs=lambda config: ("poison",),
    validate=validate_teacher,
)
STUDENT = Stage(
    "student",
    "the method: distillation from the teacher on the variations",
    run_student,
    needs=lambda config: ("poison", "teacher", "regenerate"),
    validate=validate_student,
)
VARIATIONS_ONLY = Stage(
    "variations_only",
    "baseline: cross-entropy on the variations, no teacher",
    run_variations_only,
    needs=lambda config: ("poison", "regenerate"),
    validate=validate_baselines,
)
KD_ON_ORIGINAL = Stage(
    "kd_on_original",
    "baseline: the same distillation on the poisoned originals",
    run_kd_on_original,
    needs=lambda config: ("poison", "teacher"),
)
TRUSTED_ONLY = Stage(
    "trusted_only", "baseline: cross-entropy on the trusted split alone", run_trusted_only
)
CLEAN_REFERENCE = Stage(
    "clean_reference",
    "reference: the training images without poison (the ASR floor)",
    run_clean_reference,
)
