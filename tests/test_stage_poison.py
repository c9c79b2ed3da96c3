"""Stage poison: the plan it records, and the runs it refuses."""

import json
import os

import pytest
from conftest import smoke_config

from jaxclean import attacks, pipeline
from jaxclean.artifacts import StageConflict


def test_changed_config_is_refused_not_mixed(idx_dir, tmp_path):
    workdir = str(tmp_path / "run")
    pipeline.run(smoke_config(idx_dir, num_epochs=1), workdir, "poison,teacher")
    with pytest.raises(StageConflict, match=r"teacher.*num_epochs: 1 -> 2"):
        pipeline.run(smoke_config(idx_dir, num_epochs=2), workdir, "teacher")
    other_attack = smoke_config(idx_dir, num_epochs=1)
    other_attack.attack.rate = 0.2
    with pytest.raises(StageConflict, match="rate: 0.1 -> 0.2"):
        pipeline.run(other_attack, workdir, "poison")


def test_poison_plan_that_would_differ_is_refused(idx_dir, tmp_path):
    workdir = str(tmp_path / "run")
    pipeline.run(smoke_config(idx_dir), workdir, "poison")
    plan_path = os.path.join(workdir, "poison", "plan.json")
    plan = json.load(open(plan_path))
    plan["indices"][0] += 1  # As if the data or the sampling code had changed under the run.
    json.dump(plan, open(plan_path, "w"))
    with pytest.raises(attacks.AttackError, match="differs"):
        pipeline.run(smoke_config(idx_dir), workdir, "poison")
