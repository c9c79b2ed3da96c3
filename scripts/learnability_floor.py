"""The floor of the trigger-learnability diagnostic: how low any regeneration could take it.

The diagnostics' learnability classifier trains on the variations with the poisoned labels.
A regeneration that removed every trigger and changed nothing else would hand it the
originals, each poisoned row back to its clean source, with the poisoned labels kept. This
trains the same classifier on exactly that (`learnability/trigger_removed_originals`) and on
the clean originals (`learnability/clean_originals`, the bound's reference), under each of
diagnostics.learnability_seeds seeds, and prints each seed's ASR beside the bound (the clean
model's ASR + --margin). Where the floor is over the bound, no regeneration meets it with this
classifier. It needs only the poison plan (made here when missing): no teacher, generator or
variations. The stages are the diagnostics stage's own, so a later diagnostics run of the
same workdir reads them back instead of training them again.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python scripts/learnability_floor.py \\
      --config configs/fashion_mnist_blended.py --workdir runs/blended \\
      [--config.diagnostics.learnability_seeds=3] [--margin 0.02]
"""

from __future__ import annotations

import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxclean import experiment, pipeline  # noqa: E402
from jaxclean.stages.diagnostics import learnability  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "the run's workdir (made when missing)")
_MARGIN = flags.DEFINE_float(
    "margin", 0.02, "the bound: the clean model's ASR plus this (the regeneration issue's 2 points)"
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    del argv
    config, workdir = _CONFIG.value, _WORKDIR.value
    if config.attack.name == "none":
        raise app.UsageError("the config has no attack: there are no poisoned labels to learn")
    try:
        pipeline.validate_config(config)
        os.makedirs(workdir, exist_ok=True)
        exp = experiment.Experiment(config, workdir)
        _, runs = learnability.learnability_floor(exp)
    except pipeline.INPUT_ERRORS as e:
        raise app.UsageError(str(e)) from e
    exp.writer.close()
    print(f"{'seed':>4} {'clean ASR':>9} {'bound':>7} {'floor ASR':>9} {'ASR0':>7} {'RA':>7}")
    for k, (clean, floor) in enumerate(zip(runs["clean_model"], runs["trigger_removed"])):
        bound = clean["attack_success_rate"] + _MARGIN.value
        verdict = "over the bound" if floor["attack_success_rate"] > bound else "within it"
        print(
            f"{k:>4} {clean['attack_success_rate']:>9.4f} {bound:>7.4f} "
            f"{floor['attack_success_rate']:>9.4f} {floor['untriggered_target_rate']:>7.4f} "
            f"{floor['robust_accuracy']:>7.4f}  {verdict}"
        )


if __name__ == "__main__":
    app.run(main)
