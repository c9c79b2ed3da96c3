"""Stages `ft`, `nad`, `anp`, `abl`: the field's other defenses, in the method's harness.

  ft   the teacher fine-tuned on the defender's clean data
  nad  Neural Attention Distillation: the teacher fine-tuned on the clean data again, its
       attention maps pulled to those of the `ft` model (Li et al., ICLR 2021)
  anp  Adversarial Neuron Pruning: the teacher's batch-norm channels masked against an
       adversarial perturbation on the clean data, the low masks pruned (Wu & Wang, NeurIPS
       2021)
  abl  Anti-Backdoor Learning: trained from scratch on the poisoned set, the lowest-loss share
       isolated, the rest trained on, the isolated share unlearnt (Li et al., NeurIPS 2021)

The post-training defenses (ft, nad, anp) read the defender's clean data: the trusted split
the method's generator learns from (`defenses.clean_data="trusted"`, so every defense gets
the same clean images) or BackdoorBench's 5% of the training set's size drawn from it
("fraction"). Their settings are BackdoorBench's defense configs, their epochs scaled to
Fashion-MNIST's (configs/common.py, `defenses_config`); docs/defenses.md has the details.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import numpy as np

from jaxclean import augment, checks, data, evaluate, sharding, steps, train
from jaxclean.artifacts import atomic_write_json
from jaxclean.checks import ConfigError
from jaxclean.defenses import abl, anp, nad
from jaxclean.experiment import Experiment, Stage, log
from jaxclean.models import classifier_from_recipe
from jaxclean.stages.classifier_stage import finish_classifier, load_classifier, train_classifier
from jaxclean.stages.poison import require_poison_plan

CLEAN_DATA = ("trusted", "fraction")
LR_SCHEDULES = ("step", "cosine")
ARCHITECTURE = ("model", "width", "standardize_input")


def _check_recipe(recipe, name: str, teacher=None) -> None:
    checks.recipe(recipe, name)
    checks.one_of(recipe.lr_schedule, LR_SCHEDULES, f"{name}.lr_schedule")
    if teacher is not None:
        differs = [k for k in ARCHITECTURE if recipe[k] != teacher[k]]
        if differs:
            raise ConfigError(
                f"{name} starts from the teacher's weights, but its {', '.join(differs)} "
                "differ from the teacher's: build it with common.defenses_config(config.teacher)"
            )


def validate(config) -> None:
    defenses, teacher = config.defenses, config.teacher
    checks.one_of(defenses.clean_data, CLEAN_DATA, "defenses.clean_data")
    if not 0.0 < defenses.clean_fraction <= 1.0:
        raise ConfigError(f"defenses.clean_fraction {defenses.clean_fraction} must be in (0, 1]")
    _check_recipe(defenses.ft, "defenses.ft", teacher)
    _check_recipe(defenses.nad.recipe, "defenses.nad.recipe", teacher)
    if not defenses.nad.betas or any(b < 0 for b in defenses.nad.betas):
        raise ConfigError(f"defenses.nad.betas {tuple(defenses.nad.betas)} must be >= 0")
    options = defenses.anp
    if not 0.0 < options.eps <= 1.0 or not 0.0 <= options.alpha <= 1.0:
        raise ConfigError(
            f"defenses.anp.eps {options.eps} must be in (0, 1] and alpha {options.alpha} in [0, 1]"
        )
    for key in ("steps", "iterations", "batch_size", "learning_rate"):
        checks.positive(options[key], f"defenses.anp.{key}")
    if not options.thresholds or any(not 0.0 < t < 1.0 for t in options.thresholds):
        raise ConfigError(f"defenses.anp.thresholds {tuple(options.thresholds)} must be in (0, 1)")
    options = defenses.abl
    if not 0.0 < options.isolation_ratio < 1.0:
        raise ConfigError(
            f"defenses.abl.isolation_ratio {options.isolation_ratio} must be in (0, 1)"
        )
    for phase in ("isolation", "finetuning", "unlearning"):
        _check_recipe(options[phase], f"defenses.abl.{phase}", teacher)


def clean_data(exp: Experiment) -> data.ImageDataset:
    """The defender's clean images: the trusted split, or a class-balanced share of it."""
    trusted = exp.splits.trusted
    if exp.config.defenses.clean_data == "trusted":
        return trusted
    size = math.ceil(exp.config.defenses.clean_fraction * len(exp.splits.train))
    if size > len(trusted):
        raise ConfigError(
            f"defenses.clean_fraction asks for {size} clean images; the trusted split holds "
            f"{len(trusted)}: lower it, or raise data.trusted_size"
        )
    chosen = data.balanced_holdout(trusted.labels, size, trusted.num_classes, exp.config.seed)
    return trusted.subset(chosen)


def _spec(exp: Experiment, **sections) -> dict:
    defenses = exp.config.defenses
    return {
        **exp.poison_spec(),
        "teacher": exp.upstream("teacher").spec_fingerprint,
        "clean_data": {"source": defenses.clean_data, "fraction": defenses.clean_fraction},
        **sections,
    }


def _teacher(exp: Experiment) -> dict:
    _, variables = load_classifier(exp, "teacher", exp.config.teacher, exp.splits.train.num_classes)
    return variables


# ----------------------------------------------------------------------------- ft, nad


def run_ft(exp: Experiment) -> None:
    """The teacher fine-tuned on the clean data with cross-entropy."""
    require_poison_plan(exp)
    recipe = exp.config.defenses.ft
    spec = _spec(exp, ft=recipe)
    train_classifier(
        exp,
        "ft",
        clean_data(exp),
        recipe,
        spec,
        initial=_teacher(exp),
        lr_schedule=recipe.lr_schedule,
    )


def run_nad(exp: Experiment) -> None:
    """The teacher fine-tuned again, its attention maps pulled to the ft model's."""
    require_poison_plan(exp)
    options = exp.config.defenses.nad
    recipe = options.recipe
    attention_model, attention_variables = load_classifier(
        exp, "ft", exp.config.defenses.ft, exp.splits.train.num_classes
    )
    attention_variables = jax.device_put(attention_variables, sharding.replicated(exp.mesh))
    make_step = lambda model, settings: functools.partial(  # noqa: E731
        nad.nad_step,
        teacher_apply=attention_model.apply,
        augment=settings,
        betas=tuple(options.betas),
        power=options.power,
    )
    spec = _spec(exp, nad=options, ft=exp.upstream("ft").spec_fingerprint)
    train_classifier(
        exp,
        "nad",
        clean_data(exp),
        recipe,
        spec,
        make_step=make_step,
        extra_args=(attention_variables,),
        initial=_teacher(exp),
        lr_schedule=recipe.lr_schedule,
    )


# ----------------------------------------------------------------------------- anp


def run_anp(exp: Experiment) -> None:
    """Masks learnt against adversarial neuron perturbation on the clean data, then the
    channels under a threshold pruned: the highest threshold whose pruned model keeps its
    accuracy on the clean data within `max_accuracy_drop` of the unpruned teacher's."""
    require_poison_plan(exp)
    options = exp.config.defenses.anp
    record = exp.record("anp", _spec(exp, anp=options))
    if record.is_done():
        log(f"anp: done already ({record.path('model')})")
        return
    record.claim()
    mesh = exp.mesh
    model = classifier_from_recipe(exp.config.teacher, exp.splits.train.num_classes)
    variables = _teacher(exp)
    clean = clean_data(exp)
    masks = anp.neuron_masks(variables["params"])
    state = jax.jit(
        lambda m: anp.ANPState.create(m, options.learning_rate),
        out_shardings=sharding.replicated(mesh),
    )(masks)
    step_fn = functools.partial(
        anp.anp_step,
        apply_fn=model.apply,
        eps=options.eps,
        steps=options.steps,
        alpha=options.alpha,
    )
    jitted = train.jit_step(step_fn, mesh, num_static_args=1)
    placed = jax.device_put(variables, sharding.replicated(mesh))
    steps_per_epoch = len(clean) // options.batch_size
    started = time.perf_counter()
    result = train.fit(
        state,
        lambda s, batch, rng: jitted(s, placed, batch, rng),
        clean,
        batch_size=options.batch_size,
        num_epochs=math.ceil(options.iterations / steps_per_epoch),
        seed=exp.config.seed,
        mesh=mesh,
        checkpoint_dir=record.path("checkpoints"),
        writer=exp.writer,
        prefix="anp",
        description="anp",
    )
    masks = jax.device_get(result.state.masks)
    predict_fn = train.make_predict_fn(model.apply, mesh)
    batch = exp.config.teacher.eval_batch_size

    def clean_accuracy(params):
        predicted = evaluate.predictions(
            predict_fn, {**variables, "params": params}, clean.images, batch, mesh
        )
        return evaluate.accuracy(predicted, clean.labels)

    reference = clean_accuracy(variables["params"])
    chosen, accuracies = None, {}
    for threshold in sorted(options.thresholds):
        accuracy = clean_accuracy(anp.pruned_params(variables["params"], masks, threshold))
        accuracies[f"{threshold:.2f}"] = accuracy
        if accuracy >= reference - options.max_accuracy_drop:
            chosen = threshold
    pruned = anp.pruned_params(variables["params"], masks, chosen) if chosen else None
    final = {**variables, "params": pruned if pruned is not None else variables["params"]}
    count = sum(int((np.asarray(m) < (chosen or 0.0)).sum()) for m in masks.values())
    log(
        f"anp: pruned {count} channels at threshold {chosen} (clean accuracy by threshold: "
        f"{accuracies})"
    )
    outputs = {
        "threshold": chosen,
        "pruned_channels": count,
        "clean_accuracy_by_threshold": accuracies,
    }
    timing = {"wall_seconds": round(time.perf_counter() - started, 1)}
    finish_classifier(exp, record, predict_fn, final, batch, timing, outputs)


# ----------------------------------------------------------------------------- abl


def _fit_phase(exp, record, model, dataset, recipe, step_fn, phase, initial=None, seed=0):
    """One ABL phase through the classifier loop, checkpointed in its own directory."""
    mesh = exp.mesh
    tx, schedule = train.make_optimizer(
        recipe, len(dataset) // recipe.batch_size, recipe.lr_schedule
    )
    state = train.create_train_state(model, tx, dataset.image_shape, jax.random.key(seed), mesh)
    if initial is not None:
        state = train.start_from(state, initial, mesh)
    result = train.fit(
        state,
        train.jit_step(step_fn, mesh),
        dataset,
        batch_size=recipe.batch_size,
        num_epochs=recipe.num_epochs,
        seed=seed,
        mesh=mesh,
        checkpoint_dir=record.path(f"{phase}_checkpoints"),
        schedule=schedule,
        writer=exp.writer,
        prefix=f"abl/{phase}",
        checkpoint_every_steps=recipe.checkpoint_every_steps,
        log_every_steps=recipe.log_every_steps,
        description=f"abl {phase}",
    )
    return jax.device_get(result.state.variables)


def run_abl(exp: Experiment) -> None:
    """Isolate with local gradient ascent, train on the rest, unlearn the isolated share."""
    require_poison_plan(exp)
    options = exp.config.defenses.abl
    num_isolated = math.ceil(options.isolation_ratio * len(exp.poisoned_train))
    if num_isolated < options.unlearning.batch_size:
        raise ConfigError(
            f"defenses.abl isolates {num_isolated} samples, fewer than its unlearning batch of "
            f"{options.unlearning.batch_size}: raise isolation_ratio or lower "
            "defenses.abl.unlearning.batch_size"
        )
    record = exp.record(
        "abl",
        {
            **exp.poison_spec(),
            "abl": options,
            "poisoned_fingerprint": exp.plan.poisoned_fingerprint,
        },
    )
    if record.is_done():
        log(f"abl: done already ({record.path('model')})")
        return
    record.claim()
    started = time.perf_counter()
    poisoned = exp.poisoned_train
    seed = exp.config.seed
    model = classifier_from_recipe(options.isolation, poisoned.num_classes)
    isolation = _fit_phase(
        exp,
        record,
        model,
        poisoned,
        options.isolation,
        functools.partial(
            abl.isolation_step,
            augment=augment.Augment.from_recipe(options.isolation),
            flood=options.flood,
        ),
        "isolation",
        seed=seed,
    )
    losses = abl.per_sample_losses(
        model.apply,
        isolation,
        poisoned.images,
        poisoned.labels,
        options.isolation.eval_batch_size,
        exp.mesh,
    )
    isolated = abl.isolate(losses, options.isolation_ratio)
    rest = np.setdiff1d(np.arange(len(poisoned)), isolated)
    precision = float(np.isin(isolated, exp.plan.indices).mean())
    if exp.is_writer:
        atomic_write_json(
            record.path("isolated.json"),
            {"indices": isolated.tolist(), "poisoned_share": precision},
        )
    log(f"abl: isolated {len(isolated)} samples, {precision:.3f} of them poisoned")
    finetuned = _fit_phase(
        exp,
        record,
        model,
        poisoned.subset(rest),
        options.finetuning,
        functools.partial(
            steps.train_step, augment=augment.Augment.from_recipe(options.finetuning)
        ),
        "finetuning",
        initial=isolation,
        seed=seed + 1,
    )
    final = _fit_phase(
        exp,
        record,
        model,
        poisoned.subset(isolated),
        options.unlearning,
        functools.partial(
            abl.unlearning_step, augment=augment.Augment.from_recipe(options.unlearning)
        ),
        "unlearning",
        initial=finetuned,
        seed=seed + 2,
    )
    predict_fn = train.make_predict_fn(model.apply, exp.mesh)
    timing = {"wall_seconds": round(time.perf_counter() - started, 1)}
    outputs = {"isolated": int(len(isolated)), "isolated_poisoned_share": precision}
    finish_classifier(
        exp, record, predict_fn, final, options.isolation.eval_batch_size, timing, outputs
    )


FT = Stage(
    "ft",
    "defense: the teacher fine-tuned on the defender's clean data",
    run_ft,
    needs=lambda config: ("poison", "teacher"),
    validate=validate,
)
NAD = Stage(
    "nad",
    "defense: Neural Attention Distillation against the ft model",
    run_nad,
    needs=lambda config: ("poison", "teacher", "ft"),
)
ANP = Stage(
    "anp",
    "defense: Adversarial Neuron Pruning of the teacher",
    run_anp,
    needs=lambda config: ("poison", "teacher"),
)
ABL = Stage(
    "abl",
    "defense: Anti-Backdoor Learning, from scratch on the poisoned set",
    run_abl,
    needs=lambda config: ("poison",),
)
