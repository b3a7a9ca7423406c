"""`sflam compare`: fl, sl, sfl, sfl-q and sflam on the same devices, data, channels and seeds (DESIGN §5).

Each method is a child MLflow run of one parent run; the parent gets the comparison table (CSV and
Markdown), a bar chart and the rows as JSON. Ratios are against fl (memory, accuracy) and sfl
(communication latency, energy efficiency), the paper's headline comparisons.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sflam.pipelines.baselines import METHODS, RUNNERS, method_config
from sflam.pipelines.train import train
from sflam.platform.config import ExperimentConfig
from sflam.platform.results import RoundMetrics, RunResult
from sflam.platform.tracking import Tracker

COLUMNS = ("method", "accuracy", "device_memory_bytes", "comm_latency_s", "round_latency_s", "energy_j",
           "energy_efficiency_samples_per_j")


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
                announce: Callable[[str], None] | None = None) -> CompareResult:
    target = Path(config.output_dir) / f"{config.name}-compare"
    target.mkdir(parents=True, exist_ok=True)
    parent = Tracker(config, run_name=f"{config.name}-compare", tags={"sflam.pipeline": "compare"})
    rows: list[dict[str, Any]] = []
    try:
        for method in methods:
            child = method_config(config, method)
            if announce is not None:
                announce(f"== {method}: {child.quant.weights} weights, {child.quant.activation_bits}-bit smashed data, "
                         f"allocation {child.allocation.policy}")
            on_round: Callable[[RoundMetrics], None] | None = None
            if progress is not None:
                def on_round(m: RoundMetrics, name: str = method) -> None:
                    progress(name, m)
            result: RunResult = train(child, run_name=method, parent_run_id=parent.run_id, progress=on_round,
                                      out_dir=target / method, runner=RUNNERS.get(method),
                                      experiment_name=config.tracking.experiment or config.name)
            rows.append({"method": method, **result.summary()})
    except BaseException:
        parent.close("FAILED", spill_dir=target)
        raise
    _ratios(rows)
    table_path = write_table(rows, target)
    (target / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_path = plot_compare(rows, target / "compare.png", title=f"{config.name}: methods compared")
    for path in (table_path, table_path.with_suffix(".md"), target / "compare.json", plot_path):
        parent.log_artifact(path)
    best = max(rows, key=lambda r: r["accuracy"])
    parent.set_tags({"sflam.best_accuracy_method": best["method"]})
    for row in rows:
        parent.log_metrics({f"{row['method']}_{k}": row[k] for k in COLUMNS[1:] if row.get(k) is not None}, step=0)
    parent.close("FINISHED", spill_dir=target)
    return CompareResult(rows, parent.run_id, table_path, plot_path)


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    header = ("| method | accuracy | device memory MiB | comm latency s/round | round latency s | energy J/round "
              "| samples/J | memory vs fl | comm vs sfl | efficiency vs sfl |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        lines.append(f"| {r['method']} | {fmt(r['accuracy'], '.4f')} | {fmt(r['device_memory_bytes'] / 2**20, '.2f')} "
                     f"| {fmt(r['comm_latency_s'], '.4g')} | {fmt(r['round_latency_s'], '.4g')} "
                     f"| {fmt(r['energy_j'], '.4g')} | {fmt(r['energy_efficiency_samples_per_j'], '.4g')} "
                     f"| {fmt(r.get('memory_vs_fl'), '.3f')} | {fmt(r.get('comm_latency_vs_sfl'), '.3f')} "
                     f"| {fmt(r.get('energy_efficiency_vs_sfl'), '.2f')} |")
    return lines


def write_table(rows: list[dict[str, Any]], target: Path) -> Path:
    path = target / "compare.csv"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    path.with_suffix(".md").write_text("\n".join(format_rows(rows)) + "\n")
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
        bars = ax.bar(names, values, color=colors[: len(names)])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        if key in ("comm_latency_s", "round_latency_s", "energy_j"):
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
