"""WORKDIR/report/results.json, which every stage adds its figures to, and its views: the
printed table, results.md and the metrics figure.

results.json (schema version RESULTS_SCHEMA_VERSION; docs/results.md describes each field):
  schema_version  the layout below
  experiment      the run: data, attack, poisoned count, devices
  models          per model: clean_accuracy, attack_success_rate, untriggered_target_rate,
                  robust_accuracy, defense_effectiveness_rate (after the report stage),
                  wall_seconds, train_images_per_second
  diagnostics     per measurement, prefixed with the regeneration's name
"""

from __future__ import annotations

import io
import os

from jaxclean import faults
from jaxclean.artifacts import atomic_write_bytes, atomic_write_json, read_json

# The layout of results.json; raise it when a field is renamed or changes meaning.
RESULTS_SCHEMA_VERSION = 1
SECTIONS = ("experiment", "models", "diagnostics")

METRICS = (
    ("clean_accuracy", "CA"),
    ("attack_success_rate", "ASR"),
    ("robust_accuracy", "RA"),
)
# Printed beside them: ASR's own floor, the target rate on the same images without the trigger
# (evaluate.metrics_from_predictions).
TABLE_METRICS = (*METRICS, ("untriggered_target_rate", "ASR0"))


# Table order: the model under attack, the method, then the baselines.
MODEL_ORDER = (
    "teacher",
    "student",
    "ft",
    "nad",
    "anp",
    "abl",
    "variations_only",
    "kd_on_original",
    "trusted_only",
    "clean_reference",
    "encoder",
)


def ordered_models(results: dict) -> list[tuple[str, dict]]:
    models = results.get("models", {})
    rank = {name: i for i, name in enumerate(MODEL_ORDER)}
    return sorted(models.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def results_path(workdir: str) -> str:
    return os.path.join(workdir, "report", "results.json")


def read(workdir: str) -> dict:
    """results.json, or its empty layout when no stage has written it yet."""
    path = results_path(workdir)
    results = read_json(path) if os.path.exists(path) else {}
    for section in SECTIONS:
        results.setdefault(section, {})
    results["schema_version"] = RESULTS_SCHEMA_VERSION
    return results


def update(
    workdir: str,
    experiment: dict | None = None,
    models: dict | None = None,
    diagnostics: dict | None = None,
) -> dict:
    """Merges entries into results.json and rewrites it atomically; returns the new content.

    Only process 0 calls this: stages run the same computation on every process, and one
    writer keeps the file whole.
    """
    results = read(workdir)
    if experiment:
        results["experiment"] = experiment
    for section, entries in (("models", models), ("diagnostics", diagnostics)):
        for name, value in (entries or {}).items():
            results.setdefault(section, {})[name] = value
    atomic_write_json(results_path(workdir), results)
    return results


def forget(workdir: str, prefixes) -> list[str]:
    """Removes the entries whose "section/key" starts with one of `prefixes` (a stage being
    redone); returns what it removed."""
    results = read(workdir)
    removed = []
    for section in ("models", "diagnostics"):
        for key in list(results[section]):
            if any(f"{section}/{key}".startswith(prefix) for prefix in prefixes):
                del results[section][key]
                removed.append(f"{section}/{key}")
    if removed:
        atomic_write_json(results_path(workdir), results)
    return removed


def summary_table(results: dict) -> str:
    """The models' CA / ASR / RA / ASR0 as a fixed-width text table."""
    header = f"{'model':<20}" + "".join(f"{short:>8}" for _, short in TABLE_METRICS)
    lines = [header, "-" * len(header)]
    for name, metrics in ordered_models(results):
        cells = "".join(
            f"{metrics[key]:>8.4f}" if key in metrics else f"{'-':>8}" for key, _ in TABLE_METRICS
        )
        lines.append(f"{name:<20}{cells}")
    return "\n".join(lines)


def defense_effectiveness_rate(teacher: dict, model: dict) -> float:
    """DER as BackdoorBench defines it: (max(0, dASR) - max(0, dCA) + 1) / 2 against the teacher."""
    asr_drop = teacher["attack_success_rate"] - model["attack_success_rate"]
    ca_drop = teacher["clean_accuracy"] - model["clean_accuracy"]
    return (max(0.0, asr_drop) - max(0.0, ca_drop) + 1.0) / 2.0


def add_defense_effectiveness(results: dict) -> dict:
    models = results.get("models", {})
    teacher = models.get("teacher")
    if teacher and "attack_success_rate" in teacher:
        for name, metrics in models.items():
            if name != "teacher" and "attack_success_rate" in metrics:
                metrics["defense_effectiveness_rate"] = defense_effectiveness_rate(teacher, metrics)
    return results


def finalize(workdir: str) -> None:
    """DER into results.json, then results.md and the metrics figure."""
    results = add_defense_effectiveness(read(workdir))
    atomic_write_json(results_path(workdir), results)
    faults.kill_point("report", 1)
    write_markdown(workdir)
    save_metrics_figure(results, os.path.join(workdir, "report", "metrics.png"))


def save_metrics_figure(results: dict, path: str) -> None:
    """Grouped bars of CA / ASR / RA per model, drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    models = ordered_models(results)
    if not models:
        return
    colours = {
        "clean_accuracy": (52, 101, 164),
        "attack_success_rate": (204, 0, 0),
        "robust_accuracy": (78, 154, 6),
    }
    bar, gap, height, left, top = 14, 16, 220, 40, 30
    width = left + len(models) * (3 * bar + gap) + 20
    image = Image.new("RGB", (max(width, 360), height + 90), "white")
    draw = ImageDraw.Draw(image)
    for tick in (0.0, 0.5, 1.0):
        y = top + height - int(tick * height)
        draw.line([(left - 4, y), (width, y)], fill=(220, 220, 220))
        draw.text((4, y - 6), f"{tick:.1f}", fill="black")
    for i, (name, metrics) in enumerate(models):
        x = left + i * (3 * bar + gap)
        for j, (key, _) in enumerate(METRICS):
            value = metrics.get(key)
            if value is None:
                continue
            y = top + height - int(value * height)
            draw.rectangle([x + j * bar, y, x + (j + 1) * bar - 2, top + height], fill=colours[key])
        draw.text((x, top + height + 6), name[:9], fill="black")
        draw.text((x, top + height + 18), name[9:18], fill="black")
    legend = "  ".join(f"{short}" for _, short in METRICS)
    draw.text((left, 8), f"blue / red / green = {legend}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def write_markdown(workdir: str) -> str:
    """report/results.md: the table, the experiment summary and the diagnostics."""
    results = read(workdir)
    lines = [
        "# Results",
        "",
        "| model | CA | ASR | RA | ASR0 (no trigger) | DER | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, metrics in ordered_models(results):
        cells = [f"{metrics[k]:.4f}" if k in metrics else "-" for k, _ in TABLE_METRICS]
        der = metrics.get("defense_effectiveness_rate")
        cells.append(f"{der:.4f}" if der is not None else "-")
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {metrics.get('wall_seconds', '-')} |"
        )
    lines += ["", "## Experiment", ""]
    lines += [f"- {k}: {v}" for k, v in results["experiment"].items()]
    if results.get("diagnostics"):
        lines += ["", "## Diagnostics", ""]
        lines += [f"- {k}: {v}" for k, v in results["diagnostics"].items()]
    path = os.path.join(workdir, "report", "results.md")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
