"""The attack x defense matrix: one run per attack (WORKDIR/<attack>/), the later ones reusing
what does not depend on the attack, then one table and one figure over them all.

A config asks for it with a non-empty `matrix.attacks` (configs/fashion_mnist_matrix.py):
each entry is an attack section, run with the rest of the config as it is. Every run is the
pipeline's own, so a rerun of the same command resumes the matrix where it stopped.

  WORKDIR/matrix.json   per attack, per model: CA, ASR, ASR0, RA, DER (schema version 1)
  WORKDIR/matrix.md     CA / ASR / RA / DER per cell, the best defense per column in bold
  WORKDIR/matrix.png    CA against ASR per model, one panel per attack
"""

from __future__ import annotations

import io
import os

import ml_collections

from jaxclean import results
from jaxclean.artifacts import FinishedStage, atomic_write_bytes, atomic_write_json
from jaxclean.experiment import log

MATRIX_SCHEMA_VERSION = 1
METRICS = (
    ("clean_accuracy", "CA"),
    ("attack_success_rate", "ASR"),
    ("robust_accuracy", "RA"),
    ("defense_effectiveness_rate", "DER"),
)
# Rows that are not defenses: the model under attack and the no-poison reference.
REFERENCES = ("teacher", "clean_reference")


def attack_configs(config) -> dict:
    """{attack name: the config of its run}: the config with that attack and no matrix."""
    runs = {}
    for name, attack in config.matrix.attacks.items():
        run = ml_collections.ConfigDict(config.to_dict())
        run.attack = ml_collections.ConfigDict(attack.to_dict())
        run.matrix.attacks = {}
        runs[name] = run
    return runs


def run(config, workdir: str, stages: str | None, run_one) -> dict:
    """Runs every attack of config.matrix, then writes the matrix; returns it.

    Args:
      config: a config with matrix.attacks.
      workdir: the matrix's root; each attack runs in WORKDIR/<attack>.
      stages: the stages each attack runs (all when empty).
      run_one: (config, workdir, stages) -> results: the pipeline's run.
    """
    first = None
    for name, run_config in attack_configs(config).items():
        attack_dir = os.path.join(workdir, name)
        if first is not None and config.matrix.reuse:
            # The first attack's variations of the images both poison alike, and its models
            # that see no poisoned image, are this attack's too (their records check it).
            run_config.regenerate.reuse_from = os.path.join(
                first, "regenerated", run_config.regenerate.name
            )
            if not FinishedStage.exists(run_config.regenerate.reuse_from):
                run_config.regenerate.reuse_from = ""
            attack_free = ("trusted_only", "clean_reference")
            if all(FinishedStage.exists(os.path.join(first, n)) for n in attack_free):
                run_config.reuse_attack_free_from = first
        log(f"matrix: {name} in {attack_dir}")
        run_one(run_config, attack_dir, stages)
        first = first or attack_dir
    return write(workdir, list(config.matrix.attacks))


def collect(workdir: str, attacks: list[str]) -> dict:
    """matrix.json's content from each attack's results.json."""
    cells = {}
    for attack in attacks:
        found = results.add_defense_effectiveness(results.read(os.path.join(workdir, attack)))
        cells[attack] = {
            name: {key: metrics[key] for key, _ in METRICS if key in metrics}
            | {"untriggered_target_rate": metrics.get("untriggered_target_rate")}
            for name, metrics in results.ordered_models(found)
            if name != "encoder"
        }
    return {"schema_version": MATRIX_SCHEMA_VERSION, "attacks": attacks, "cells": cells}


def _best(cells: dict, attack: str, key: str, lowest: bool) -> set[str]:
    values = {
        name: metrics[key]
        for name, metrics in cells[attack].items()
        if name not in REFERENCES and key in metrics
    }
    if not values:
        return set()
    target = min(values.values()) if lowest else max(values.values())
    return {name for name, value in values.items() if value == target}


def markdown(matrix: dict) -> str:
    """One row per model, CA / ASR / RA / DER per attack; per attack the defense with the
    highest CA, the lowest ASR, the highest RA and the highest DER in bold."""
    attacks, cells = matrix["attacks"], matrix["cells"]
    models = []
    for attack in attacks:
        models += [name for name in cells[attack] if name not in models]
    header = (
        "| model | "
        + " | ".join(f"{attack} {short}" for attack in attacks for _, short in METRICS)
        + " |"
    )
    lines = [header, "|---" * (1 + len(attacks) * len(METRICS)) + "|"]
    best = {
        (attack, key): _best(cells, attack, key, lowest=key == "attack_success_rate")
        for attack in attacks
        for key, _ in METRICS
    }
    for model in models:
        row = []
        for attack in attacks:
            metrics = cells[attack].get(model, {})
            for key, _ in METRICS:
                if key not in metrics:
                    row.append("-")
                    continue
                text = f"{metrics[key]:.4f}"
                row.append(f"**{text}**" if model in best[(attack, key)] else text)
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


_COLOURS = {
    "teacher": (204, 0, 0),
    "student": (52, 101, 164),
    "clean_reference": (78, 154, 6),
}


def figure(matrix: dict, path: str) -> None:
    """CA (up) against ASR (right) per model, one panel per attack; the method in blue, the
    teacher in red, the clean reference in green, the other defenses grey."""
    from PIL import Image, ImageDraw

    panel, margin = 260, 36
    attacks = matrix["attacks"]
    image = Image.new(
        "RGB", (len(attacks) * (panel + margin) + margin, panel + 2 * margin), "white"
    )
    draw = ImageDraw.Draw(image)
    for i, attack in enumerate(attacks):
        left, top = margin + i * (panel + margin), margin
        draw.rectangle([left, top, left + panel, top + panel], outline=(160, 160, 160))
        draw.text((left, 8), f"{attack}: CA (up) / ASR (right)", fill="black")
        for tick in (0.0, 0.5, 1.0):
            x = left + int(tick * panel)
            y = top + panel - int(tick * panel)
            draw.text((x - 6, top + panel + 4), f"{tick:.1f}", fill="black")
            draw.text((left - 26, y - 6), f"{tick:.1f}", fill="black")
        for name, metrics in matrix["cells"][attack].items():
            if "attack_success_rate" not in metrics:
                continue
            x = left + int(metrics["attack_success_rate"] * panel)
            y = top + panel - int(metrics["clean_accuracy"] * panel)
            colour = _COLOURS.get(name, (110, 110, 110))
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            draw.text((x + 6, y - 6), name[:12], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def write(workdir: str, attacks: list[str]) -> dict:
    matrix = collect(workdir, attacks)
    atomic_write_json(os.path.join(workdir, "matrix.json"), matrix)
    atomic_write_bytes(os.path.join(workdir, "matrix.md"), markdown(matrix).encode())
    figure(matrix, os.path.join(workdir, "matrix.png"))
    log(f"matrix: {os.path.join(workdir, 'matrix.md')}\n" + markdown(matrix))
    return matrix
