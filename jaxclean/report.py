"""The report: WORKDIR/report/results.json, shared by every stage, and its printed table."""

from __future__ import annotations

import os

from jaxclean.artifacts import atomic_write_bytes, atomic_write_json, read_json

METRICS = (
    ("clean_accuracy", "CA"),
    ("attack_success_rate", "ASR"),
    ("robust_accuracy", "RA"),
)


def results_path(workdir: str) -> str:
    return os.path.join(workdir, "report", "results.json")


def read_results(workdir: str) -> dict:
    path = results_path(workdir)
    if os.path.exists(path):
        return read_json(path)
    return {"experiment": {}, "models": {}, "diagnostics": {}}


def update_results(
    workdir: str,
    experiment: dict | None = None,
    models: dict | None = None,
    diagnostics: dict | None = None,
) -> dict:
    """Merges entries into results.json and rewrites it atomically; returns the new content.

    Only process 0 calls this: stages run the same computation on every process, and one
    writer keeps the file whole.
    """
    results = read_results(workdir)
    if experiment:
        results["experiment"] = experiment
    for section, entries in (("models", models), ("diagnostics", diagnostics)):
        for name, value in (entries or {}).items():
            results.setdefault(section, {})[name] = value
    atomic_write_json(results_path(workdir), results)
    return results


def summary_table(results: dict) -> str:
    """The models' CA / ASR / RA as a fixed-width text table."""
    header = f"{'model':<20}" + "".join(f"{short:>8}" for _, short in METRICS)
    lines = [header, "-" * len(header)]
    for name, metrics in results.get("models", {}).items():
        cells = "".join(
            f"{metrics[key]:>8.4f}" if key in metrics else f"{'-':>8}" for key, _ in METRICS
        )
        lines.append(f"{name:<20}{cells}")
    return "\n".join(lines)


def write_markdown(workdir: str) -> str:
    """report/results.md: the table, the experiment summary and the diagnostics."""
    results = read_results(workdir)
    lines = ["# Results", "", "| model | CA | ASR | RA | wall s |", "|---|---|---|---|---|"]
    for name, metrics in results.get("models", {}).items():
        cells = [f"{metrics[k]:.4f}" if k in metrics else "-" for k, _ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {metrics.get('wall_seconds', '-')} |")
    lines += ["", "## Experiment", ""]
    lines += [f"- {k}: {v}" for k, v in results.get("experiment", {}).items()]
    if results.get("diagnostics"):
        lines += ["", "## Diagnostics", ""]
        lines += [f"- {k}: {v}" for k, v in results["diagnostics"].items()]
    path = os.path.join(workdir, "report", "results.md")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
