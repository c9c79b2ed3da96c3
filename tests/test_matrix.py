"""The attack x defense matrix: one run per attack with reuse, then one table and one figure."""

import json
import os

import pytest
from conftest import run_launch, smoke_args

from jaxclean import matrix


def test_markdown_marks_the_best_defense_per_column_and_not_the_references():
    cells = {
        "a": {
            "teacher": {"clean_accuracy": 0.9, "attack_success_rate": 1.0},
            "student": {"clean_accuracy": 0.85, "attack_success_rate": 0.02},
            "ft": {"clean_accuracy": 0.88, "attack_success_rate": 0.5},
            "clean_reference": {"clean_accuracy": 0.95, "attack_success_rate": 0.01},
        }
    }
    table = matrix.markdown({"attacks": ["a"], "cells": cells})
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:]}
    assert "**0.8800**" in rows["ft"] and "**0.0200**" in rows["student"]
    # The references are rows to compare with, never the best defense.
    assert "**" not in rows["teacher"] and "**" not in rows["clean_reference"]
    assert table.splitlines()[0].startswith("| model | a CA | a ASR | a RA | a DER |")


@pytest.mark.slow
def test_a_matrix_on_the_smoke_config_runs_each_attack_with_reuse(idx_dir, tmp_path):
    workdir = str(tmp_path / "matrix")
    attacks = (
        '--config.matrix.attacks={"badnets": {"name": "badnets", "target": 0, "rate": 0.1, '
        '"rate_of": "eligible", "include_target": False, "seed": 0, "trigger": {"pattern": '
        '"checkerboard", "size": 3, "location": "bottom_right", "seed": 0}}, "blended": {"name": '
        '"blended", "target": 0, "rate": 0.1, "rate_of": "eligible", "include_target": False, '
        '"seed": 0, "trigger": {"pattern": "noise", "ratio": 0.2, "noise_seed": 42}}}'
    )
    stages = "--stages=poison,teacher,ft,anp,trusted_only,clean_reference,report"
    result = run_launch(smoke_args(workdir, idx_dir, attacks, stages))
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.load(open(os.path.join(workdir, "matrix.json")))
    assert found["schema_version"] == 1 and found["attacks"] == ["badnets", "blended"]
    for attack in ("badnets", "blended"):
        models = found["cells"][attack]
        assert {"teacher", "ft", "anp", "trusted_only", "clean_reference"} <= set(models)
        assert 0.0 <= models["ft"]["defense_effectiveness_rate"] <= 1.0
    # The second attack adopted what sees no poisoned image from the first.
    done = json.load(open(os.path.join(workdir, "blended", "clean_reference", "done.json")))
    assert done["adopted_from"].endswith(os.path.join("badnets", "clean_reference"))
    table = open(os.path.join(workdir, "matrix.md")).read()
    assert "badnets CA" in table and "blended ASR" in table and "| ft |" in table
    assert os.path.getsize(os.path.join(workdir, "matrix.png")) > 1000
    # A rerun resumes: every stage of both attacks is done already.
    again = run_launch(smoke_args(workdir, idx_dir, attacks, stages))
    assert again.returncode == 0 and again.stdout.count("teacher: done already") == 2
