"""`sflam scale`: the same experiment at growing numbers of devices per round, as child MLflow runs.

Reports, per size, the simulated round latency and device energy (from the cost model) and the wall
time per round on this machine, as a table and a plot against the number of devices per round.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sflam.pipelines.figures import save_figure
from sflam.pipelines.train import train
from sflam.platform.checkpoint import checkpoint_path
from sflam.platform.config import ExperimentConfig, config_from_dict
from sflam.platform.files import atomic_path, write_text
from sflam.platform.results import RoundMetrics
from sflam.platform.tracking import Tracker

DEFAULT_SIZES = (10, 100, 1000)


@dataclass
class ScaleResult:
    rows: list[dict[str, Any]]
    parent_run_id: str | None
    table_path: Path
    plot_path: Path


def sized_config(config: ExperimentConfig, devices_per_round: int) -> ExperimentConfig:
    tree = config.to_dict()
    tree["name"] = f"{config.name}-k{devices_per_round}"
    tree["data"] = {**tree["data"], "num_devices": max(config.data.num_devices, devices_per_round)}
    tree["train"] = {**tree["train"], "devices_per_round": devices_per_round}
    return config_from_dict(tree)


def run_scale(config: ExperimentConfig, sizes: tuple[int, ...] = DEFAULT_SIZES,
              progress: Callable[[int, RoundMetrics], None] | None = None,
              announce: Callable[[str], None] | None = None, resume: bool = False) -> ScaleResult:
    """Each size as a child run; `resume` continues member by member (finished members are only re-recorded)."""
    target = Path(config.output_dir) / f"{config.name}-scale"
    target.mkdir(parents=True, exist_ok=True)
    parent_file = target / "parent_run_id"
    previous = parent_file.read_text().strip() if resume and parent_file.is_file() else None
    parent = Tracker(config, run_name=f"{config.name}-scale", tags={"sflam.pipeline": "scale"},
                     resume_run_id=previous or None)
    if parent.run_id:
        write_text(parent_file, parent.run_id)
    rows: list[dict[str, Any]] = []
    try:
        for K in sizes:
            child = sized_config(config, K)
            if announce is not None:
                announce(f"== {K} devices per round ({child.data.num_devices} devices, runtime {child.runtime})")
            on_round: Callable[[RoundMetrics], None] | None = None
            if progress is not None:
                def on_round(m: RoundMetrics, size: int = K) -> None:
                    progress(size, m)
            member = target / f"k{K}"
            result = train(child, run_name=f"k={K}", parent_run_id=parent.run_id, progress=on_round,
                           out_dir=member, experiment_name=config.tracking.experiment or config.name,
                           resume=resume and checkpoint_path(member).is_file())
            summary = result.summary()
            rows.append({"devices_per_round": K, "accuracy": summary["accuracy"],
                         "round_latency_s": summary["round_latency_s"], "comm_latency_s": summary["comm_latency_s"],
                         "energy_j": summary["energy_j"],
                         "energy_per_device_j": (summary["energy_j"] or 0) / K,
                         "wall_s_per_round": float(np.median([r.wall_s for r in result.rounds])),
                         "device_memory_bytes": summary["device_memory_bytes"],
                         "mlflow_run_id": result.mlflow_run_id})
    except BaseException as failure:
        parent.close("FAILED", spill_dir=target, reason=f"{type(failure).__name__}: {str(failure)[:1000]}")
        raise
    table_path = target / "scale.csv"
    with atomic_path(table_path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text(target / "scale.json", json.dumps(rows, indent=2) + "\n")
    plot_path = plot_scale(rows, target / "scale.png", title=f"{config.name}: scaling the devices per round")
    for path in (table_path, target / "scale.json", plot_path):
        parent.log_artifact(path)
    for row in rows:
        parent.log_metrics({k: row[k] for k in ("round_latency_s", "energy_j", "wall_s_per_round")
                            if row[k] is not None}, step=int(row["devices_per_round"]))
    parent.close("FINISHED", spill_dir=target)
    return ScaleResult(rows, parent.run_id, table_path, plot_path)


def format_scale(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| devices per round | accuracy | round latency s | comm latency s | energy J/round | J per device "
             "| wall s/round |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['devices_per_round']} | {r['accuracy']:.4f} | {r['round_latency_s']:.4g} "
                     f"| {r['comm_latency_s']:.4g} | {r['energy_j']:.4g} | {r['energy_per_device_j']:.4g} "
                     f"| {r['wall_s_per_round']:.3g} |")
    return lines


def plot_scale(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = [r["devices_per_round"] for r in rows]
    panels = [("simulated round latency (s)", "round_latency_s", "tab:blue"),
              ("device energy per round (J, all devices)", "energy_j", "tab:green"),
              ("wall time per round on this machine (s)", "wall_s_per_round", "tab:red")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), dpi=110)
    for ax, (label, key, color) in zip(axes, panels, strict=True):
        ax.plot(k, [r[key] for r in rows], "o-", color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("devices per round")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path, title)
