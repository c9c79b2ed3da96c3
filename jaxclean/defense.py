"""The classifiers of the method and its baselines, each a stage.

  teacher          cross-entropy on the poisoned training set (no defense)
  student          the method: distillation from the teacher on the variations (and, with
                   student.include_trusted, the trusted split's own images)
  variations_only  cross-entropy on the variations, no teacher
  kd_on_original   the same distillation on the poisoned originals: is it regeneration, or
                   distillation, that removes the backdoor?
  trusted_only     cross-entropy on the trusted split alone: why not just use the clean data?
  clean_reference  cross-entropy on the training images without poison: the best a defense
                   can hope for, and the ASR floor

All share one recipe (config.student; the teacher has config.teacher) and one evaluation. The
cross-entropy baselines read their images as the student reads its own: with
student.student_corruption p (and student.corrupt_baselines, on by default), each image gets the
same photometric corruption with probability p.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections

from jaxclean import generation, regenerate, sharding, train
from jaxclean.artifacts import differences, read_json, to_jsonable, without_unset
from jaxclean.data import ImageDataset
from jaxclean.experiment import (
    ConfigError,
    Experiment,
    load_classifier,
    require_poison_plan,
    train_classifier,
)


def validate_distillation(recipe) -> None:
    if not 0.0 <= recipe.alpha <= 1.0:
        raise ConfigError(f"student.alpha {recipe.alpha} must be in [0, 1]")
    if recipe.temperature <= 0:
        raise ConfigError(f"student.temperature {recipe.temperature} must be > 0")
    if not 0.0 <= recipe.get("student_corruption", 0.0) <= 1.0:
        raise ConfigError(
            f"student.student_corruption {recipe.student_corruption} must be a probability "
            "in [0, 1]"
        )
    seed_offset = recipe.get("seed_offset", 0)
    if not isinstance(seed_offset, int) or seed_offset < 0:
        raise ConfigError(f"student.seed_offset {seed_offset!r} must be an integer >= 0")
    if recipe.get("include_trusted", False) and recipe.select == "best":
        raise ConfigError(
            "student.include_trusted trains on the trusted split, which student.select='best' "
            "selects the weights on: use select='last'"
        )


def teacher_stage(exp: Experiment) -> None:
    """Trains the (possibly backdoored) teacher on the poisoned training set, as is."""
    require_poison_plan(exp)
    spec = {
        **exp.poison_spec(),
        "teacher": exp.config.teacher,
        "poisoned_fingerprint": exp.plan.poisoned_fingerprint,
    }
    train_classifier(exp, "teacher", exp.poisoned_train, exp.config.teacher, spec)


def _variations(exp: Experiment) -> tuple[ImageDataset, str]:
    """The finished variations of this run's poisoned set, and their record's fingerprint."""
    directory = generation.variations_dir(exp)
    done = os.path.join(directory, "done.json")
    spec_path = os.path.join(directory, "spec.json")
    if not os.path.exists(done):
        raise ConfigError(
            f"no complete variations dataset in {directory}: run --stages=regenerate first"
        )
    spec = read_json(spec_path)
    if spec.get("poisoned_fingerprint") != exp.plan.poisoned_fingerprint:
        raise ConfigError(
            f"the variations in {directory} were made from another poison plan than the "
            "teacher's; regenerate them for this run"
        )
    try:
        dataset = generation.load_variations(exp)
    except regenerate.VariationsError as e:
        raise ConfigError(str(e)) from e
    return dataset, read_json(done)["spec_fingerprint"]


def _teacher(exp: Experiment):
    model, variables = load_classifier(
        exp, "teacher", exp.config.teacher, exp.splits.train.num_classes
    )
    # Placed once, replicated, rather than copied to the devices at every step.
    return model, jax.device_put(variables, sharding.replicated(exp.mesh))


def _distilled(exp: Experiment, name: str, dataset: ImageDataset, spec: dict) -> None:
    recipe = exp.config.student
    validate_distillation(recipe)
    if recipe.get("include_trusted", False):
        # The defender's own clean images, the ones the generator learnt from: real images
        # beside the variations narrow the gap between what the student trains on and what it
        # is tested on. The teacher labels them like the rest.
        dataset = dataset.concatenate(exp.splits.trusted)
    teacher_model, teacher_variables = _teacher(exp)
    offset = None
    if recipe.get("teacher_prior_correction", False):
        offset = train.teacher_prior_correction(
            exp.poisoned_train.labels, exp.splits.trusted.labels, exp.splits.train.num_classes
        )
    make_step = lambda model, augment: functools.partial(  # noqa: E731
        train.distill_step,
        teacher_apply=teacher_model.apply,
        augment=augment,
        alpha=recipe.alpha,
        temperature=recipe.temperature,
        student_corruption=recipe.get("student_corruption", 0.0),
        teacher_logit_offset=offset,
    )
    teacher_record = read_json(os.path.join(exp.workdir, "teacher", "done.json"))
    spec = {
        **spec,
        "student": _spec_recipe(recipe, distills=True),
        "teacher": teacher_record["spec_fingerprint"],
    }
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
        seed=exp.config.seed + recipe.get("seed_offset", 0),
    )


# The student recipe's fields that only distillation reads; those added after the first
# records were made are recorded only when on.
_LATER_DISTILLATION_FIELDS = (
    "student_corruption",
    "include_trusted",
    "teacher_prior_correction",
    "seed_offset",
)
_DISTILLATION_FIELDS = ("alpha", "temperature", *_LATER_DISTILLATION_FIELDS)
# Fields recorded through their effect (the baselines' `corruption`), not themselves.
_DERIVED_FIELDS = ("corrupt_baselines",)


def _spec_recipe(recipe, *, distills: bool):
    """The student recipe as a stage's spec records it: the fields the stage reads.

    The cross-entropy baselines share the recipe but not its distillation fields, so changing
    alpha, T or include_trusted must not retrain them (student_corruption reaches them only
    through `baseline_recipe`'s `corruption`). The distilled models record the later fields only
    when they are on, so that their records made before those fields existed stay valid while
    they are off.
    """
    recipe = recipe.to_dict()  # A copy, and unlocked (launch.py locks the config).
    if distills:
        recipe = without_unset(recipe, _LATER_DISTILLATION_FIELDS)
    dropped = _DERIVED_FIELDS if distills else (*_DISTILLATION_FIELDS, *_DERIVED_FIELDS)
    return {k: v for k, v in recipe.items() if k not in dropped}


def baseline_recipe(recipe) -> ml_collections.ConfigDict:
    """The student recipe as the cross-entropy baselines train with it.

    The student reads each image through a photometric corruption with probability
    student_corruption; a baseline that reads clean images only is no like-for-like
    comparison. On Fashion-MNIST Blended a clean reference trained without it called 73% of
    blended test images something else than their class (RA 0.274), so that its ASR of 0.001
    measured that confusion rather than a floor a defense could reach; trained through the
    corruption, CA 0.9157, ASR 0.0180, RA 0.896 (README, "Results"). An explicit
    `corruption` of the recipe is kept; corrupt_baselines=False gives the clean-image recipe.
    """
    recipe = ml_collections.ConfigDict(recipe.to_dict())
    shared = recipe.get("corrupt_baselines", True) and recipe.get("student_corruption", 0.0)
    if shared and not recipe.get("corruption", 0.0):
        # Set only when on, so that records made before it existed stay valid without it.
        recipe.corruption = shared
    return recipe


def student_stage(exp: Experiment) -> None:
    """The method: distill the teacher into a fresh classifier on the variations."""
    require_poison_plan(exp)
    validate_distillation(exp.config.student)
    load_classifier(exp, "teacher", exp.config.teacher, exp.splits.train.num_classes)
    variations, fingerprint = _variations(exp)
    _distilled(exp, "student", variations, {**exp.poison_spec(), "variations": fingerprint})


def kd_on_original_stage(exp: Experiment) -> None:
    """Baseline: the same distillation on the poisoned originals, no regeneration."""
    require_poison_plan(exp)
    spec = {**exp.poison_spec(), "poisoned_fingerprint": exp.plan.poisoned_fingerprint}
    _distilled(exp, "kd_on_original", exp.poisoned_train, spec)


def variations_only_stage(exp: Experiment) -> None:
    """Baseline: cross-entropy on the variations with their (poisoned) labels, no teacher."""
    require_poison_plan(exp)
    variations, fingerprint = _variations(exp)
    recipe = baseline_recipe(exp.config.student)
    spec = {
        **exp.poison_spec(),
        "student": _spec_recipe(recipe, distills=False),
        "variations": fingerprint,
    }
    train_classifier(exp, "variations_only", variations, recipe, spec)


def trusted_only_stage(exp: Experiment) -> None:
    """Baseline: a classifier trained on the trusted split alone."""
    _attack_free_classifier(exp, "trusted_only", exp.splits.trusted)


def clean_reference_stage(exp: Experiment) -> None:
    """Reference: the same training images without poison; the floor for ASR."""
    _attack_free_classifier(exp, "clean_reference", exp.splits.train)


def _attack_free_classifier(exp: Experiment, name: str, dataset: ImageDataset) -> None:
    """A classifier that sees no poisoned image: the attack only enters its evaluation.

    So two runs on the same data with different attacks train the same model, and with
    config.reuse_attack_free_from (the other run's workdir) the second adopts the first's
    weights and only evaluates them against its own attack.
    """
    recipe = baseline_recipe(exp.config.student)
    training = {**exp.data_spec(), "student": _spec_recipe(recipe, distills=False)}
    spec = {**training, "attack_for_eval": exp.config.attack}
    source = exp.config.get("reuse_attack_free_from", "")
    done_here = exp.record(name, spec).is_done()
    adopt = _adoptable_stage(source, name, training) if source and not done_here else ""
    train_classifier(exp, name, dataset, recipe, spec, adopt_from=adopt)


def _adoptable_stage(source: str, name: str, training: dict) -> str:
    """`source`'s finished `name` stage, refused unless it was trained as `training` says."""
    directory = os.path.join(source, name)
    if not os.path.exists(os.path.join(directory, "done.json")):
        raise ConfigError(
            f"reuse_attack_free_from: no finished {name} in {source}; run it there first, "
            "or leave reuse_attack_free_from empty to train it here"
        )
    theirs = read_json(os.path.join(directory, "spec.json"))
    theirs.pop("attack_for_eval", None)
    changes = differences(theirs, to_jsonable(training))
    if changes:
        raise ConfigError(
            f"reuse_attack_free_from: {directory} was trained otherwise than this run's "
            f"{name} ({'; '.join(changes[:8])})"
        )
    return directory
