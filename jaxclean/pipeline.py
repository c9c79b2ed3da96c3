"""The stages of an experiment and what makes each one idempotent.

A stage is a function of the Experiment (config, workdir, mesh, lazily loaded data) that
writes its outputs under WORKDIR/<stage>/ and marks itself done. `run` walks the requested
stages in order, skipping those already done with the same spec.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from collections.abc import Callable

import jax

from jaxclean import attacks, checkpointing, data, evaluate, report, sharding, train
from jaxclean.artifacts import StageConflict, StageRecord, atomic_write_json, read_json, to_jsonable
from jaxclean.metrics import MetricWriter
from jaxclean.models import make_classifier


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


# ----------------------------------------------------------------------------- stages


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


def _require_poison_plan(exp: Experiment) -> None:
    """Later stages use the poisoned set: make sure it is the recorded one."""
    poison_stage(exp)


def validate_recipe(recipe, name: str) -> None:
    for key in ("num_epochs", "batch_size", "learning_rate"):
        if recipe[key] <= 0:
            raise ConfigError(f"{name}.{key} must be positive, got {recipe[key]}")
    if recipe.select not in ("last", "best"):
        raise ConfigError(f"{name}.select must be 'last' or 'best', got {recipe.select!r}")


def train_classifier(
    exp: Experiment,
    name: str,
    dataset: data.ImageDataset,
    recipe,
    spec: dict,
    make_step: Callable | None = None,
    extra_args: tuple = (),
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

    Returns:
      The evaluation metrics, or None when the stage was already done.
    """
    validate_recipe(recipe, name)
    record = exp.record(name, spec)
    if record.is_done():
        log(f"{name}: done already ({record.path('model')})")
        return None
    record.claim()
    mesh = exp.mesh
    model = make_classifier(recipe.model, dataset.num_classes, width=recipe.width)
    steps_per_epoch = len(dataset) // recipe.batch_size
    tx, schedule = train.make_optimizer(recipe, steps_per_epoch)
    state = train.create_train_state(
        model, tx, dataset.image_shape, jax.random.key(exp.config.seed), mesh
    )
    augment = train.Augment(crop_padding=recipe.crop_padding, flip=recipe.flip)
    if make_step is None:
        step_fn = functools.partial(train.train_step, augment=augment)
    else:
        step_fn = make_step(model, augment)
    jitted = train.jit_step(step_fn, mesh, num_static_args=len(extra_args))
    step = (lambda s, b, r: jitted(s, *extra_args, b, r)) if extra_args else jitted
    predict_fn = train.make_predict_fn(model.apply, mesh)
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
        seed=exp.config.seed,
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
    checkpointing.save_tree(record.path("model"), jax.device_get(variables))
    metrics = evaluate.evaluate_classifier(
        predict_fn, variables, exp.splits.test, exp.triggered, recipe.eval_batch_size, mesh
    )
    metrics["wall_seconds"] = round(result.wall_seconds, 1)
    metrics["train_images_per_second"] = round(result.images_per_second, 1)
    if exp.is_writer:
        report.update_results(exp.workdir, experiment=experiment_summary(exp), models={name: metrics})
        record.mark_done({"metrics": metrics, "final_step": int(result.state.step)})
    exp.writer.write_scalars(int(result.state.step), {f"eval/{name}/{k}": v for k, v in metrics.items()})
    exp.writer.flush()
    log(f"{name}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return metrics


def load_classifier(exp: Experiment, name: str, recipe, num_classes: int):
    """The (module, variables) a finished classifier stage exported."""
    record_dir = os.path.join(exp.workdir, name)
    if not os.path.exists(os.path.join(record_dir, "done.json")):
        raise ConfigError(
            f"no finished {name} in {exp.workdir}: run --stages={name} first"
        )
    model = make_classifier(recipe.model, num_classes, width=recipe.width)
    return model, checkpointing.load_tree(os.path.join(record_dir, "model"))


def teacher_stage(exp: Experiment) -> None:
    """Trains the (possibly backdoored) teacher on the poisoned training set, as is."""
    _require_poison_plan(exp)
    spec = {**exp.poison_spec(), "teacher": exp.config.teacher,
            "poisoned_fingerprint": exp.plan.poisoned_fingerprint}
    train_classifier(exp, "teacher", exp.poisoned_train, exp.config.teacher, spec)


def report_stage(exp: Experiment) -> None:
    """Writes report/results.md from results.json (launch.py prints the same table)."""
    if exp.is_writer:
        report.write_markdown(exp.workdir)


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


STAGES = {
    stage.name: stage
    for stage in (
        Stage("poison", poison_stage, "poison the training set and record the plan"),
        Stage("teacher", teacher_stage, "train the teacher on the poisoned set"),
        Stage("report", report_stage, "print the results table"),
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


def main(config, workdir: str, stages: str | None) -> None:
    """launch.py's body: runs, then prints the table; bad input exits with its message."""
    import sys

    try:
        results = run(config, workdir, stages)
    except (
        ConfigError,
        data.DataError,
        attacks.AttackError,
        StageConflict,
    ) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from e
    log("\n" + report.summary_table(results))
    log(f"results: {report.results_path(workdir)}")
