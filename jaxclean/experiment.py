"""What every stage shares: the Experiment (config, workdir, mesh, data loaded once), the
poison plan check, and the helper that trains, exports, evaluates and reports one classifier.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable

import jax

from jaxclean import attacks, checkpointing, data, evaluate, report, sharding, train
from jaxclean.artifacts import StageRecord, atomic_write_json, read_json, to_jsonable
from jaxclean.metrics import MetricWriter
from jaxclean.models import classifier_from_recipe


class ConfigError(ValueError):
    """A config or command line that cannot be run."""


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


class Experiment:
    """What every stage shares: config, workdir, mesh, writer, and the data, loaded once."""

    def __init__(self, config, workdir: str):
        self.config = config
        self.workdir = workdir
        self.mesh = sharding.make_mesh()
        self.writer = MetricWriter(os.path.join(workdir, "tensorboard"))
        self.is_writer = jax.process_index() == 0

    @functools.cached_property
    def splits(self) -> data.Splits:
        return data.load_splits(self.config.data, self.config.seed)

    @functools.cached_property
    def poisoned(self) -> tuple[data.ImageDataset, attacks.PoisonPlan]:
        return attacks.poison(self.splits.train, self.config.attack)

    @property
    def poisoned_train(self) -> data.ImageDataset:
        return self.poisoned[0]

    @property
    def plan(self) -> attacks.PoisonPlan:
        return self.poisoned[1]

    @functools.cached_property
    def triggered(self) -> attacks.TriggeredTestSets | None:
        return attacks.triggered_test_sets(self.splits.test, self.config.attack)

    def record(self, name: str, spec: dict) -> StageRecord:
        return StageRecord(self.workdir, name, spec)

    def data_spec(self) -> dict:
        return {"seed": self.config.seed, "data": self.config.data}

    def poison_spec(self) -> dict:
        return {**self.data_spec(), "attack": self.config.attack}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Experiment], None]
    help: str


# ----------------------------------------------------------------------------- shared stage pieces


def poison_stage(exp: Experiment) -> None:
    """Poisons the training set and records the plan; refuses a plan that differs."""
    record = exp.record("poison", exp.poison_spec())
    plan_path = record.path("plan.json")
    if record.is_done():
        stored = read_json(plan_path)
        current = exp.plan.to_json()
        if stored != to_jsonable(current):
            raise attacks.AttackError(
                f"the poison plan in {plan_path} differs from the one this config makes now "
                "(data or code changed?): refusing to mix them. Use a new --workdir."
            )
        log(f"poison: plan matches {plan_path} ({len(exp.plan.indices)} poisoned)")
        return
    record.claim()
    plan = exp.plan
    if exp.is_writer:
        atomic_write_json(plan_path, plan.to_json())
        record.mark_done({"num_poisoned": len(plan.indices)})
    log(
        f"poison: {exp.config.attack.name}, {len(plan.indices)} of {len(exp.poisoned_train)} "
        f"training images relabelled to class {plan.target}"
    )


def require_poison_plan(exp: Experiment) -> None:
    """Later stages use the poisoned set: make sure it is the recorded one."""
    poison_stage(exp)


def validate_recipe(recipe, name: str) -> None:
    for key in ("num_epochs", "batch_size", "learning_rate"):
        if recipe[key] <= 0:
            raise ConfigError(f"{name}.{key} must be positive, got {recipe[key]}")
    if recipe.select not in ("last", "best"):
        raise ConfigError(f"{name}.select must be 'last' or 'best', got {recipe.select!r}")
    if not 0.0 <= recipe.get("corruption", 0.0) <= 1.0:
        raise ConfigError(f"{name}.corruption {recipe.corruption} must be a probability in [0, 1]")
    if recipe.get("invariance_weight", 0.0) < 0.0:
        raise ConfigError(f"{name}.invariance_weight {recipe.invariance_weight} must be >= 0")
    if recipe.get("corruption_noise", 0.2) < 0.0:
        raise ConfigError(
            f"{name}.corruption_noise {recipe.corruption_noise} must be a standard deviation >= 0"
        )


def train_classifier(
    exp: Experiment,
    name: str,
    dataset: data.ImageDataset,
    recipe,
    spec: dict,
    make_step: Callable | None = None,
    extra_args: tuple = (),
    report_section: str = "models",
    adopt_from: str = "",
    seed: int | None = None,
) -> dict | None:
    """Trains one classifier as a stage, exports its weights, evaluates and reports it.

    Args:
      exp: the experiment.
      name: stage and model name, e.g. "teacher".
      dataset: what it trains on.
      recipe: the training recipe (config.teacher or config.student).
      spec: what the stage depends on, for its manifest.
      make_step: builds the unjitted step from (model, augment); default cross-entropy.
      extra_args: replicated arguments passed to the step before the batch (the teacher).
      report_section: where results.json lists it: "models", or "diagnostics" for helper
        classifiers that are measurements rather than defenses.
      adopt_from: the stage directory of the same classifier, trained the same way, in another
        workdir (the caller checks that): its weights are copied and evaluated, not retrained.
      seed: of its initialisation and data order (default: config.seed); a repeat of the same
        classifier under another seed needs its own name and a spec that names the seed.

    Returns:
      The evaluation metrics (read back from the stage's record when it was already done).
    """
    validate_recipe(recipe, name)
    record = exp.record(name, spec)
    if record.is_done():
        log(f"{name}: done already ({record.path('model')})")
        metrics = record.done_record()["metrics"]
        # Only the writer reads the report; a lost entry is restored, a present one (maybe
        # newer, with DER) is kept whole.
        if exp.is_writer and name not in report.read_results(exp.workdir).get(report_section, {}):
            report.update_results(exp.workdir, **{report_section: {name: metrics}})
        return metrics
    record.claim()
    model = classifier_from_recipe(recipe, dataset.num_classes)
    # One predict function for the "best" selection during training and the final evaluation.
    predict_fn = train.make_predict_fn(model.apply, exp.mesh)
    if adopt_from:
        started = time.perf_counter()
        variables = checkpointing.load_tree(os.path.join(adopt_from, "model"))
        log(f"{name}: adopted the weights of {adopt_from}")
        timing = {"wall_seconds": round(time.perf_counter() - started, 1)}
        outputs = {"adopted_from": os.path.abspath(adopt_from)}
    else:
        seed = exp.config.seed if seed is None else seed
        variables, timing, outputs = fit_classifier(
            exp, record, name, model, predict_fn, dataset, recipe, make_step, extra_args, seed
        )
    checkpointing.save_tree(record.path("model"), jax.device_get(variables))
    predicted = evaluate.classifier_predictions(
        predict_fn, variables, exp.splits.test, exp.triggered, recipe.eval_batch_size, exp.mesh
    )
    metrics = evaluate.metrics_from_predictions(predicted, exp.splits.test, exp.triggered)
    metrics.update(timing)
    if exp.is_writer:
        report.update_results(
            exp.workdir, experiment=experiment_summary(exp), **{report_section: {name: metrics}}
        )
        record.mark_done({"metrics": metrics, **outputs})
    step = outputs.get("final_step", 0)
    exp.writer.write_scalars(step, {f"eval/{name}/{k}": v for k, v in metrics.items()})
    exp.writer.flush()
    log(f"{name}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return metrics


def fit_classifier(
    exp, record, name, model, predict_fn, dataset, recipe, make_step, extra_args, seed
):
    """Trains (or resumes) one classifier; returns its final weights, timing and record fields.

    The training half of `train_classifier`, for classifiers that are evaluated otherwise (the
    trigger detectors of the diagnostics): checkpoints under record's directory, so a rerun
    resumes; `recipe.select == "best"` validates on the trusted split, so it needs a classifier
    of the dataset's own classes.
    """
    mesh = exp.mesh
    steps_per_epoch = len(dataset) // recipe.batch_size
    tx, schedule = train.make_optimizer(recipe, steps_per_epoch)
    state = train.create_train_state(model, tx, dataset.image_shape, jax.random.key(seed), mesh)
    augment = train.Augment(
        crop_padding=recipe.crop_padding,
        flip=recipe.flip,
        # Absent from recipes written before it existed (their specs stay as they were).
        corruption=recipe.get("corruption", 0.0),
        corruption_noise=recipe.get("corruption_noise", 0.2),
    )
    if make_step is None:
        step_fn = functools.partial(train.train_step, augment=augment)
    else:
        step_fn = make_step(model, augment)
    jitted = train.jit_step(step_fn, mesh, num_static_args=len(extra_args))
    step = (lambda s, b, r: jitted(s, *extra_args, b, r)) if extra_args else jitted
    best = {"accuracy": -1.0}

    def on_epoch_end(epoch: int, state: train.TrainState) -> None:
        if recipe.select != "best":
            return
        # The trusted split is clean and held out of every training set: a fair validation set.
        val = evaluate.accuracy(
            evaluate.predictions(
                predict_fn, state.variables, exp.splits.trusted.images, recipe.eval_batch_size, mesh
            ),
            exp.splits.trusted.labels,
        )
        exp.writer.write_scalars(int(state.step), {f"{name}/val_accuracy": val})
        if val > best["accuracy"]:
            best.update(accuracy=val, epoch=epoch)
            checkpointing.save_tree(record.path("best"), jax.device_get(state.variables))

    log(f"{name}: training {recipe.model} on {len(dataset)} images for {recipe.num_epochs} epochs")
    result = train.fit(
        state,
        step,
        dataset,
        batch_size=recipe.batch_size,
        num_epochs=recipe.num_epochs,
        seed=seed,
        mesh=mesh,
        checkpoint_dir=record.path("checkpoints"),
        schedule=schedule,
        writer=exp.writer,
        prefix=name,
        checkpoint_every_steps=recipe.checkpoint_every_steps,
        max_to_keep=recipe.max_to_keep,
        log_every_steps=recipe.log_every_steps,
        on_epoch_end=on_epoch_end,
        description=name,
    )
    variables = result.state.variables
    if recipe.select == "best" and os.path.isdir(record.path("best")):
        variables = checkpointing.load_tree(record.path("best"), variables)
    timing = {
        "wall_seconds": round(result.wall_seconds, 1),
        "train_images_per_second": round(result.images_per_second, 1),
    }
    return variables, timing, {"final_step": int(result.state.step)}


def load_classifier(exp: Experiment, name: str, recipe, num_classes: int):
    """The (module, variables) a finished classifier stage exported."""
    record_dir = os.path.join(exp.workdir, name)
    if not os.path.exists(os.path.join(record_dir, "done.json")):
        raise ConfigError(f"no finished {name} in {exp.workdir}: run --stages={name} first")
    model = classifier_from_recipe(recipe, num_classes)
    return model, checkpointing.load_tree(os.path.join(record_dir, "model"))


def experiment_summary(exp: Experiment) -> dict:
    config = exp.config
    summary = {
        "dataset": config.data.source,
        "train_size": len(exp.splits.train),
        "trusted_size": len(exp.splits.trusted),
        "test_size": len(exp.splits.test),
        "attack": config.attack.name,
        "trigger": to_jsonable(config.attack.trigger),
        "poisoning_rate": config.attack.rate,
        "target": config.attack.target,
        "num_poisoned": int(len(exp.plan.indices)),
        "teacher_model": config.teacher.model,
        "seed": config.seed,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
    }
    return summary
