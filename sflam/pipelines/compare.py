"""`sflam compare`: fl, sl, sfl, sfl-v2, sfl-q and sflam on the same devices, data, channels and seeds
(docs/concepts/round-engine.md).

Each method is a child MLflow run of one parent run; the parent gets the comparison table (CSV and
Markdown), a bar chart and the rows as JSON. Ratios are against fl (memory, accuracy) and sfl
(communication latency, energy efficiency), the paper's headline comparisons. With `tune`, each method first
gets its own learning rates from a study on validation data (sflam.pipelines.tune): a child run per study,
tune.json beside compare.json, and the chosen values as columns `tuned_device_lr`, `tuned_server_lr`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sflam.pipelines.baselines import METHODS, RUNNERS, method_config
from sflam.pipelines.figures import save_figure
from sflam.pipelines.seeds import aggregate, mean_ci, seed_configs, with_ci
from sflam.pipelines.train import train
from sflam.pipelines.tune import Tuned, tune_methods
from sflam.platform.checkpoint import checkpoint_path
from sflam.platform.config import ExperimentConfig
from sflam.platform.files import atomic_path, write_text
from sflam.platform.results import RoundMetrics, RunResult
from sflam.platform.tracking import Tracker

COLUMNS = ("method", "accuracy", "device_memory_bytes", "comm_latency_s", "round_latency_s", "energy_j",
           "energy_efficiency_samples_per_j", "leakage", "privacy_epsilon")


@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    parent_run_id: str | None
    table_path: Path
    plot_path: Path | None


def _ratios(rows: list[dict[str, Any]]) -> None:
    by = {r["method"]: r for r in rows}
    for row in rows:
        fl, sfl = by.get("fl"), by.get("sfl")
        if fl and fl["device_memory_bytes"]:
            row["memory_vs_fl"] = row["device_memory_bytes"] / fl["device_memory_bytes"]
            row["accuracy_vs_fl_points"] = 100 * (row["accuracy"] - fl["accuracy"])
        if sfl and sfl["comm_latency_s"]:
            row["comm_latency_vs_sfl"] = row["comm_latency_s"] / sfl["comm_latency_s"]
            row["round_latency_vs_sfl"] = row["round_latency_s"] / sfl["round_latency_s"]
            row["energy_efficiency_vs_sfl"] = (row["energy_efficiency_samples_per_j"]
                                               / sfl["energy_efficiency_samples_per_j"])


def run_compare(config: ExperimentConfig, methods: tuple[str, ...] = METHODS,
                progress: Callable[[str, RoundMetrics], None] | None = None,
                announce: Callable[[str], None] | None = None, seeds: int = 1, resume: bool = False,
                tune: bool = False) -> CompareResult:
    """Every method on the same devices, data and channels; with several seeds, each seed in turn and the
    table of means with 95 % confidence intervals (ratios paired within a seed). `resume` continues member
    by member (finished members are only re-recorded) under the same parent MLflow run. `tune` first gives every
    method its own learning rates from a study on validation data (sflam.pipelines.tune); every seed runs at them."""
    target = Path(config.output_dir) / f"{config.name}-compare"
    target.mkdir(parents=True, exist_ok=True)
    parent_file = target / "parent_run_id"
    previous = parent_file.read_text().strip() if resume and parent_file.is_file() else None
    parent = Tracker(config, run_name=f"{config.name}-compare", tags={"sflam.pipeline": "compare",
                                                                       "sflam.seeds": str(seeds),
                                                                       "sflam.tuned": str(tune).lower()},
                     resume_run_id=previous or None)
    if parent.run_id:
        write_text(parent_file, parent.run_id)
    per_seed: list[list[dict[str, Any]]] = []
    curves: dict[str, list[Curve]] = {m: [] for m in methods}
    tuned: dict[str, Tuned] = {}
    try:
        if tune:
            tuned = tune_methods(config, methods, parent.run_id, target, announce or (lambda text: None), resume)
        for seed_config in seed_configs(config, seeds):
            rows: list[dict[str, Any]] = []
            for method in methods:
                child = method_config(seed_config, method)
                tags: dict[str, str] = {}
                if method in tuned:  # the seeds run at the method's tuned values, evaluated on the test split
                    child = tuned[method].apply(child)
                    tags = {"sflam.tuned_by": tuned[method].mlflow_run_id or "-"}
                if announce is not None:
                    announce(f"== {method} (seed {seed_config.seed}): {child.quant.weights} weights, "
                             f"{child.quant.activation_bits}-bit smashed data, allocation {child.allocation.policy}")
                on_round: Callable[[RoundMetrics], None] | None = None
                if progress is not None:
                    def on_round(m: RoundMetrics, name: str = method) -> None:
                        progress(name, m)
                name = method if seeds == 1 else f"{method}-seed{seed_config.seed}"
                out_dir = target / method if seeds == 1 else target / f"seed{seed_config.seed}" / method
                result: RunResult = train(child, run_name=name, parent_run_id=parent.run_id, progress=on_round,
                                          out_dir=out_dir, runner=RUNNERS.get(method), tags=tags,
                                          experiment_name=config.tracking.experiment or config.name,
                                          resume=resume and checkpoint_path(out_dir).is_file())
                rows.append({"method": method, "seed": seed_config.seed, **result.summary()})
                curves[method].append(Curve.of(result))
            _ratios(rows)
            per_seed.append(rows)
    except BaseException:
        parent.close("FAILED", spill_dir=target)
        raise
    rows = [aggregate([seed_rows[i] for seed_rows in per_seed]) for i in range(len(methods))]
    for row in rows:
        if row["method"] in tuned:
            row.update(tuned[row["method"]].columns())
    table_path = write_table(rows, target)
    write_text(target / "compare.json", json.dumps(rows, indent=2) + "\n")
    if tuned:
        parent.log_artifact(target / "tune.json")
        parent.log_params({f"{m}.tuned_{k}": repr(v) for m, t in tuned.items() for k, v in t.values.items()})
    plot_path = plot_compare(rows, target / "compare.png", title=f"{config.name}: methods compared")
    curves_path = plot_curves(curves, target / "compare_curves.png",
                              title=f"{config.name}: test accuracy against simulated time and device energy")
    for path in (table_path, table_path.with_suffix(".md"), target / "compare.json", plot_path, curves_path):
        parent.log_artifact(path)
    best = max(rows, key=lambda r: r["accuracy"])
    parent.set_tags({"sflam.best_accuracy_method": best["method"]})
    for row in rows:
        parent.log_metrics({f"{row['method']}_{k}": row[k] for k in COLUMNS[1:] if row.get(k) is not None}, step=0)
    parent.close("FINISHED", spill_dir=target)
    return CompareResult(rows, parent.run_id, table_path, plot_path)


@dataclass(frozen=True)
class Curve:
    """One run's test accuracy at its evaluated rounds against cumulative simulated time and device energy."""

    rounds: list[int]
    time_s: list[float]
    energy_j: list[float]
    accuracy: list[float]

    @classmethod
    def of(cls, result: RunResult) -> Curve:
        time_s = np.cumsum([r.round_latency_s or 0.0 for r in result.rounds])
        energy = np.cumsum([r.energy_j or 0.0 for r in result.rounds])
        at = [i for i, r in enumerate(result.rounds) if r.eval_accuracy is not None]
        return cls([result.rounds[i].round for i in at], [float(time_s[i]) for i in at],
                   [float(energy[i]) for i in at], [float(result.rounds[i].eval_accuracy) for i in at])  # type: ignore[arg-type]


def plot_curves(curves: dict[str, list[Curve]], path: Path, title: str) -> Path:
    """Accuracy against cumulative simulated time and energy, one line per method (mean over seeds, 95 % band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    for method, runs in curves.items():
        if not runs or not runs[0].rounds:
            continue
        n = min(len(c.rounds) for c in runs)
        acc = np.array([c.accuracy[:n] for c in runs])
        mean = acc.mean(axis=0)
        half = np.array([mean_ci(list(acc[:, i]))[1] for i in range(n)]) if len(runs) > 1 else np.zeros(n)
        for ax, xs in ((axes[0], [c.time_s[:n] for c in runs]), (axes[1], [c.energy_j[:n] for c in runs])):
            x = np.mean(np.array(xs), axis=0)
            line, = ax.plot(x, mean, "o-", label=method, markersize=3)
            if len(runs) > 1:
                ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=0.15)
    for ax, label in zip(axes, ("cumulative simulated time (s)", "cumulative device energy (J)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend()
    return save_figure(fig, path, title)


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    header = ("| method | seeds | accuracy | device memory MiB | comm latency s/round | round latency s | "
              "energy J/round | samples/J | memory vs fl | comm vs sfl | efficiency vs sfl | leakage | epsilon "
              "| labels sent |")
    tuned = any(r.get("tuned_device_lr") is not None for r in rows)
    if tuned:
        header += " tuned device lr | tuned server lr |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|" + "---:|---:|" * tuned]
    for r in rows:
        mib = {**r, "mib": r["device_memory_bytes"] / 2**20 if r.get("device_memory_bytes") is not None else None,
               "mib_ci95": (r.get("device_memory_bytes_ci95") or float("nan")) / 2**20}
        lines.append(f"| {r['method']} | {r.get('seeds', 1)} | {with_ci(r, 'accuracy', '.4f')} "
                     f"| {with_ci(mib, 'mib', '.2f')} | {with_ci(r, 'comm_latency_s', '.4g')} "
                     f"| {with_ci(r, 'round_latency_s', '.4g')} | {with_ci(r, 'energy_j', '.4g')} "
                     f"| {with_ci(r, 'energy_efficiency_samples_per_j', '.4g')} "
                     f"| {with_ci(r, 'memory_vs_fl', '.3f')} | {with_ci(r, 'comm_latency_vs_sfl', '.3f')} "
                     f"| {with_ci(r, 'energy_efficiency_vs_sfl', '.2f')} | {with_ci(r, 'leakage', '.3f')} "
                     f"| {with_ci(r, 'privacy_epsilon', '.3g')} | {_labels(r)} |"
                     + (f" {_lr(r.get('tuned_device_lr'))} | {_lr(r.get('tuned_server_lr'))} |" if tuned else ""))
    return lines


def _lr(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _labels(row: dict[str, Any]) -> str:
    """Whether a method's labels leave the devices."""
    sent = row.get("labels_sent")
    return "-" if sent is None else ("yes" if sent is True else "no" if sent is False else "mixed")


def write_table(rows: list[dict[str, Any]], target: Path) -> Path:
    path = target / "compare.csv"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    write_text(path.with_suffix(".md"), "\n".join(format_rows(rows)) + "\n")
    return path


def plot_compare(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    panels = [("test accuracy", "accuracy", 1.0), ("device memory (MiB)", "device_memory_bytes", 1 / 2**20),
              ("communication latency per round (s)", "comm_latency_s", 1.0),
              ("round latency (s)", "round_latency_s", 1.0), ("device energy per round (J)", "energy_j", 1.0),
              ("energy efficiency (samples / J)", "energy_efficiency_samples_per_j", 1.0)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=110)
    colors = ["tab:gray", "tab:brown", "tab:orange", "tab:olive", "tab:blue"]
    for ax, (label, key, scale) in zip(axes.flat, panels, strict=True):
        values = [(r[key] or 0) * scale for r in rows]
        errors = [(r.get(f"{key}_ci95") or 0) * scale for r in rows]
        errors = [e if np.isfinite(e) else 0 for e in errors]
        bars = ax.bar(names, values, yerr=errors if any(errors) else None, capsize=4, color=colors[: len(names)])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        if key in ("comm_latency_s", "round_latency_s", "energy_j"):
            ax.set_yscale("log")
    return save_figure(fig, path, title)
