"""One classifier as a stage: trained (or resumed, or adopted), exported, evaluated, reported.

The teacher, the student, the baselines and the diagnostics' classifiers all go through
`train_classifier`; the trigger detectors, which are scored otherwise, through its training
half, `fit_classifier`.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import jax

from jaxclean import augment, checkpointing, data, evaluate, results, steps, train
from jaxclean.artifacts import CorruptOutput, StageRecord
from jaxclean.experiment import Experiment, log
from jaxclean.models import classifier_from_recipe


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
    initial: dict | None = None,
    lr_schedule: str = "step",
) -> dict:
    """Trains one classifier as a stage, exports its weights, evaluates and reports it.

    Args:
      exp: the experiment.
      name: stage and model name, e.g. "teacher".
      dataset: what it trains on.
      recipe: its training recipe (a `configs.common.classifier_recipe`).
      spec: what the stage depends on, for its record.
      make_step: builds the unjitted step from (model, augment); default cross-entropy.
      extra_args: replicated arguments passed to the step before the batch (the teacher).
      report_section: where results.json lists it: "models", or "diagnostics" for helper
        classifiers that are measurements rather than defenses.
      adopt_from: the stage directory of the same classifier, trained the same way, in another
        workdir (the caller checks that): its weights are copied and evaluated, not retrained.
      seed: of its initialisation and data order (default: config.seed); a repeat of the same
        classifier under another seed needs its own name and a spec that names the seed.
      initial: variables to start from instead of a fresh initialisation (a defense that
        fine-tunes the teacher); the optimizer starts fresh.
      lr_schedule: "step" (the recipe's lr_decay_epochs) or "cosine".

    Returns:
      The evaluation metrics (read back from the stage's record when it was already done).
    """
    record = exp.record(name, spec)
    if record.is_done():
        log(f"{name}: done already ({record.path('model')})")
        metrics = record.done_record()["metrics"]
        # Only the writer reads the report; a lost entry is restored, a present one (maybe
        # newer, with DER) is kept whole.
        if exp.is_writer and name not in results.read(exp.workdir)[report_section]:
            results.update(exp.workdir, **{report_section: {name: metrics}})
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
            exp,
            record,
            name,
            model,
            predict_fn,
            dataset,
            recipe,
            make_step,
            extra_args,
            seed,
            initial=initial,
            lr_schedule=lr_schedule,
        )
    return finish_classifier(
        exp, record, predict_fn, variables, recipe.eval_batch_size, timing, outputs, report_section
    )


def finish_classifier(
    exp: Experiment,
    record: StageRecord,
    predict_fn,
    variables: dict,
    eval_batch_size: int,
    timing: dict,
    outputs: dict,
    report_section: str = "models",
) -> dict:
    """Exports a classifier stage's final weights, evaluates and reports them, and marks the
    stage done; its metrics. The second half of `train_classifier`, for stages that make
    their weights otherwise (a defense that prunes)."""
    name = record.name
    checkpointing.save_tree(record.path("model"), jax.device_get(variables))
    predicted = evaluate.classifier_predictions(
        predict_fn, variables, exp.splits.test, exp.triggered, eval_batch_size, exp.mesh
    )
    metrics = evaluate.metrics_from_predictions(predicted, exp.splits.test, exp.triggered)
    metrics.update(timing)
    if exp.is_writer:
        results.update(exp.workdir, experiment=exp.summary(), **{report_section: {name: metrics}})
        record.mark_done({"metrics": metrics, **outputs})
    exp.writer.write_scalars(
        outputs.get("final_step", 0), {f"eval/{name}/{k}": v for k, v in metrics.items()}
    )
    exp.writer.flush()
    log(f"{name}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return metrics


def fit_classifier(
    exp: Experiment,
    record: StageRecord,
    name: str,
    model,
    predict_fn,
    dataset,
    recipe,
    make_step: Callable | None,
    extra_args: tuple,
    seed: int,
    initial: dict | None = None,
    lr_schedule: str = "step",
):
    """Trains (or resumes) one classifier; returns its final weights, timing and record fields.

    Checkpoints under the record's directory, so a rerun resumes; `recipe.select == "best"`
    validates on the trusted split, so it needs a classifier of the dataset's own classes.
    """
    mesh = exp.mesh
    steps_per_epoch = len(dataset) // recipe.batch_size
    tx, schedule = train.make_optimizer(recipe, steps_per_epoch, lr_schedule)
    state = train.create_train_state(model, tx, dataset.image_shape, jax.random.key(seed), mesh)
    if initial is not None:
        state = train.start_from(state, initial, mesh)
    settings = augment.Augment.from_recipe(recipe)
    if make_step is None:
        step_fn = functools.partial(steps.train_step, augment=settings)
    else:
        step_fn = make_step(model, settings)
    jitted = train.jit_step(step_fn, mesh, num_static_args=len(extra_args))
    step = (lambda s, b, r: jitted(s, *extra_args, b, r)) if extra_args else jitted
    best = {"accuracy": -1.0}

    def on_epoch_end(epoch: int, state: steps.TrainState) -> None:
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
    finished = exp.upstream(name)
    model = classifier_from_recipe(recipe, num_classes)
    try:
        return model, checkpointing.load_tree(finished.path("model"))
    except (CorruptOutput, FileNotFoundError) as e:
        raise CorruptOutput(finished.path("model"), str(e), stage=name) from None
