"""Re-evaluates finished classifiers of a run with the current evaluation, e.g. for a metric
added after they were trained (ASR0, `untriggered_target_rate`).

Prints CA, ASR, ASR0 and RA for each stage, computed by `evaluate.metrics_from_predictions` exactly
as the stage itself does, and with --update merges them into the run's report/results.json
(keeping the entries' wall times) and rewrites results.md. The stages' own records are left
as they were. With --by_class it also prints, per true class of the triggered non-target test
images, the target rate without and with the trigger, and where the triggered images went
(`evaluate.target_rates_by_class`). The diagnostics' learnability classifiers
(`learnability/...`) are evaluated with their own recipe.

  python scripts/evaluate_models.py --config configs/fashion_mnist_blended.py \
      --workdir runs/blended [--stages=teacher,student] [--update] [--by_class] \
      [--config.KEY=VALUE]

The config and its overrides are the run's, as given to launch.py.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxclean import evaluate, experiment, results, train  # noqa: E402
from jaxclean.stages.classifier_stage import load_classifier  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_STAGES = flags.DEFINE_string("stages", "", "Comma-separated; empty: every finished classifier.")
_UPDATE = flags.DEFINE_bool("update", False, "Merge the metrics into report/results.json.")
_BY_CLASS = flags.DEFINE_bool("by_class", False, "Also print target rates per true class.")
flags.mark_flags_as_required(["config", "workdir"])

# Every reported classifier but the generator's encoder, whose recipe is the generator's.
CLASSIFIERS = tuple(name for name in results.MODEL_ORDER if name != "encoder")
# The recipe each classifier trained with, by stage.
RECIPES = {
    "teacher": "teacher",
    "student": "student",
    "kd_on_original": "student",
    "variations_only": "baselines",
    "trusted_only": "baselines",
    "clean_reference": "baselines",
}


def print_by_class(exp, predicted: evaluate.Predictions) -> None:
    triggered = exp.triggered
    labels = triggered.true_labels
    rates = evaluate.target_rates_by_class(
        predicted.clean[triggered.source_indices],
        predicted.triggered,
        labels,
        exp.config.attack.target,
        exp.splits.train.num_classes,
    )
    print(f"  {'class':>5} {'images':>6} {'ASR0':>7} {'ASR':>7}")
    for c, (asr0, asr) in enumerate(
        zip(rates["untriggered_target_rate"], rates["triggered_target_rate"], strict=True)
    ):
        if (labels == c).any():
            print(f"  {c:>5} {(labels == c).sum():>6} {asr0:>7.4f} {asr:>7.4f}")
    print(f"  triggered images predicted as each class: {rates['triggered_predictions']}")


def main(argv) -> None:
    del argv
    config, workdir = _CONFIG.value, _WORKDIR.value
    exp = experiment.Experiment(config, workdir)
    stages = [s for s in _STAGES.value.split(",") if s] or [
        s for s in CLASSIFIERS if os.path.exists(os.path.join(workdir, s, "done.json"))
    ]
    if _UPDATE.value and any(s.startswith("learnability/") for s in stages):
        # Their figures live under `diagnostics`, written by the diagnostics stage.
        raise app.UsageError("--update writes the models table; leave out learnability/ stages")
    stored = results.read(workdir)["models"]
    updated = {}
    for stage in stages:
        if stage.startswith("learnability/"):
            recipe = config.diagnostics.learnability
        elif stage in RECIPES:
            recipe = config[RECIPES[stage]]
        else:
            raise app.UsageError(f"{stage!r} is not a classifier stage: use one of {CLASSIFIERS}")
        model, variables = load_classifier(exp, stage, recipe, exp.splits.train.num_classes)
        predict_fn = train.make_predict_fn(model.apply, exp.mesh)
        # One pass of inference serves the metrics and the per-class rates.
        predicted = evaluate.classifier_predictions(
            predict_fn, variables, exp.splits.test, exp.triggered, recipe.eval_batch_size, exp.mesh
        )
        metrics = evaluate.metrics_from_predictions(predicted, exp.splits.test, exp.triggered)
        print(f"{stage}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
        if _BY_CLASS.value and exp.triggered is not None:
            print_by_class(exp, predicted)
        updated[stage] = {**stored.get(stage, {}), **metrics}
    if _UPDATE.value and exp.is_writer:
        results.update(workdir, models=updated)
        results.finalize(workdir)
        print(results.summary_table(results.read(workdir)))


if __name__ == "__main__":
    app.run(main)
