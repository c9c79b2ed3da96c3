"""Re-evaluates finished classifiers of a run with the current evaluation, e.g. for a metric
added after they were trained (ASR0, `untriggered_target_rate`).

Prints CA, ASR, ASR0 and RA for each stage, computed by `evaluate.evaluate_classifier` exactly
as the stage itself does, and with --update merges them into the run's report/results.json
(keeping the entries' wall times) and rewrites results.md. The stages' own records are left
as they were.

  python scripts/evaluate_models.py --config configs/fashion_mnist_blended.py \
      --workdir runs/blended [--stages=teacher,student] [--update] [--config.KEY=VALUE]

The config and its overrides are the run's, as given to launch.py.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxclean import evaluate, experiment, report, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_STAGES = flags.DEFINE_string("stages", "", "Comma-separated; empty: every finished classifier.")
_UPDATE = flags.DEFINE_bool("update", False, "Merge the metrics into report/results.json.")
flags.mark_flags_as_required(["config", "workdir"])

# Every reported classifier but the generator's encoder, whose recipe is the generator's.
CLASSIFIERS = tuple(name for name in report.MODEL_ORDER if name != "encoder")


def main(argv) -> None:
    del argv
    config, workdir = _CONFIG.value, _WORKDIR.value
    exp = experiment.Experiment(config, workdir)
    stages = [s for s in _STAGES.value.split(",") if s] or [
        s for s in CLASSIFIERS if os.path.exists(os.path.join(workdir, s, "done.json"))
    ]
    stored = report.read_results(workdir).get("models", {})
    updated = {}
    for stage in stages:
        recipe = config.teacher if stage == "teacher" else config.student
        model, variables = experiment.load_classifier(
            exp, stage, recipe, exp.splits.train.num_classes
        )
        predict_fn = train.make_predict_fn(model.apply, exp.mesh)
        metrics = evaluate.evaluate_classifier(
            predict_fn, variables, exp.splits.test, exp.triggered, recipe.eval_batch_size, exp.mesh
        )
        print(f"{stage}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
        updated[stage] = {**stored.get(stage, {}), **metrics}
    if _UPDATE.value and exp.is_writer:
        report.update_results(workdir, models=updated)
        report.finalize(workdir)
        print(report.summary_table(report.read_results(workdir)))


if __name__ == "__main__":
    app.run(main)
