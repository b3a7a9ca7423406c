"""Typed results of a run: per-round metrics, the summary of docs/reference/cli.md, and a readable table."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sflam.platform.files import write_text
from sflam.platform.strategies import Adapter


@dataclass(kw_only=True)
class RoundMetrics:
    """What one round did and cost. Cost fields stay None until the cost model fills them."""

    round: int
    train_loss: float
    train_accuracy: float
    samples: int
    uplink_bits: int
    downlink_bits: int
    wall_s: float
    eval_accuracy: float | None = None
    eval_loss: float | None = None
    step_losses: list[float] = field(default_factory=list)  # the server's mean loss of each local step
    round_latency_s: float | None = None
    comm_latency_s: float | None = None
    compute_latency_s: float | None = None
    energy_j: float | None = None
    bits_mean: float | None = None
    bits_min: float | None = None
    bits_max: float | None = None
    power_mean_w: float | None = None
    power_max_w: float | None = None
    bandwidth_min_hz: float | None = None
    bandwidth_max_hz: float | None = None
    objective: float | None = None
    selected: int = 0   # devices selected (over-selection included)
    finished: int = 0   # devices whose adapters entered the aggregation
    dropped: int = 0    # devices that dropped out mid-round
    late: int = 0       # over-selected devices that would have finished after the K first
    leakage: float | None = None  # the best monitoring attack's headline metric (privacy.evaluate_every)
    leakage_metrics: dict[str, float] = field(default_factory=dict, repr=False)  # every attack's metrics
    plan: Any = field(default=None, repr=False, compare=False)  # the RoundPlan (per-device allocation)


@dataclass(kw_only=True)
class RunResult:
    """A finished run: its rounds, final evaluation, adapters and resource figures."""

    config: dict[str, Any]
    rounds: list[RoundMetrics]
    accuracy: float
    loss: float
    wall_s: float
    devices: int
    devices_per_round: int
    device_weight_bytes: int
    device_adapter: Adapter = field(repr=False)
    server_state: Adapter = field(repr=False)
    device_memory_bytes: int | None = None
    mlflow_run_id: str | None = None
    memory: Any = field(default=None, repr=False)  # DeviceMemory breakdown
    kernels: dict[str, str] = field(default_factory=dict)  # the device part's kernels (quantization.kernel_path)
    privacy: dict[str, Any] = field(default_factory=dict)  # labels sent, the DP guarantee of a noise defence
    device_classes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> devices, memory_mib

    def fleet(self) -> dict[str, Any]:
        """The summary's fleet keys (only with devices.classes): each class's devices and memory budget (with LoRA
        ranks per class its rank and the device-part peak measured at that rank), and the devices a fixed cut would
        exclude because the measured device-part peak (at their class's rank) exceeds their class's budget."""
        if not self.device_classes:
            return {}

        def over_memory(spec: dict[str, Any]) -> int | None:
            peak = spec.get("memory_bytes") or self.device_memory_bytes
            return None if peak is None else (spec["devices"] if peak > spec["memory_mib"] * 2**20 else 0)

        classes = {name: {**spec, "over_memory": over_memory(spec)} for name, spec in self.device_classes.items()}
        counts = [spec["over_memory"] for spec in classes.values()]
        return {"device_classes": classes, "devices_over_memory": None if None in counts else sum(counts)}

    def summary(self) -> dict[str, Any]:
        """The summary keys of docs/reference/cli.md (cost figures are None until the cost model exists)."""

        def mean(key: str) -> float | None:
            values = [getattr(r, key) for r in self.rounds if getattr(r, key) is not None]
            return sum(values) / len(values) if values else None

        energy = mean("energy_j")
        samples = sum(r.samples for r in self.rounds)
        total_energy = sum(r.energy_j for r in self.rounds if r.energy_j is not None) if energy is not None else None
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "rounds": len(self.rounds),
            "devices": self.devices,
            "devices_per_round": self.devices_per_round,
            "round_latency_s": mean("round_latency_s"),
            "comm_latency_s": mean("comm_latency_s"),
            "compute_latency_s": mean("compute_latency_s"),
            "energy_j": energy,
            "energy_efficiency_samples_per_j": (samples / total_energy) if total_energy else None,
            "device_memory_bytes": self.device_memory_bytes,
            "device_weight_bytes": self.device_weight_bytes,
            "uplink_bits_per_round": mean("uplink_bits"),
            "downlink_bits_per_round": mean("downlink_bits"),
            "wall_s": self.wall_s,
            "mlflow_run_id": self.mlflow_run_id,
            # the last measured leakage (privacy.evaluate_every): token accuracy or SSIM of the best attack
            "leakage": next((r.leakage for r in reversed(self.rounds) if r.leakage is not None), None),
            **self.privacy,
            **self.fleet(),
            "kernels": dict(self.kernels),
        }

    def write_json(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.summary(), indent=2) + "\n")  # never a half-written summary

    def rounds_as_dicts(self) -> list[dict[str, Any]]:
        return [{f.name: getattr(r, f.name) for f in fields(r) if f.name != "plan"} for r in self.rounds]


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def round_line(metrics: RoundMetrics, total_rounds: int) -> str:
    evaluated = (f"  test acc {metrics.eval_accuracy:.4f}  test loss {metrics.eval_loss:.4f}"
                 if metrics.eval_accuracy is not None else "")
    costs = (f"  T {metrics.round_latency_s:.3g} s  E {metrics.energy_j:.3g} J  bits {metrics.bits_mean:.3g}"
             if metrics.round_latency_s is not None else "")
    return (f"round {metrics.round:>3}/{total_rounds}  train loss {metrics.train_loss:.4f}  "
            f"train acc {metrics.train_accuracy:.3f}  up {metrics.uplink_bits / 8e6:.2f} MB  "
            f"down {metrics.downlink_bits / 8e6:.2f} MB{costs}  {metrics.wall_s:.1f} s{evaluated}")


def format_table(result: RunResult) -> str:
    """The closing table: evaluated rounds, then the summary."""
    header = (f"{'round':>5} {'train loss':>10} {'test acc':>9} {'test loss':>9} {'up MB':>8} {'down MB':>8} "
              f"{'latency s':>10} {'comm s':>8} {'energy J':>9} {'bits':>5} {'wall s':>7}")
    lines = [header, "-" * len(header)]
    for r in result.rounds:
        if r.eval_accuracy is None:
            continue
        lines.append(f"{r.round:>5} {r.train_loss:>10.4f} {_fmt(r.eval_accuracy, '.4f'):>9} "
                     f"{_fmt(r.eval_loss, '.4f'):>9} {r.uplink_bits / 8e6:>8.2f} {r.downlink_bits / 8e6:>8.2f} "
                     f"{_fmt(r.round_latency_s, '.4g'):>10} {_fmt(r.comm_latency_s, '.4g'):>8} "
                     f"{_fmt(r.energy_j, '.4g'):>9} {_fmt(r.bits_mean, '.3g'):>5} {r.wall_s:>7.1f}")
    lines.append("")
    summary = {k: v for k, v in result.summary().items() if not isinstance(v, dict)}
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        text = _fmt(value, ".6g") if isinstance(value, float) else ("-" if value is None else str(value))
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)


@dataclass(kw_only=True)
class Resume:
    """Where a run continues from (read from its last checkpoint)."""

    next_round: int
    global_adapter: Adapter
    rounds: list[RoundMetrics]
    accuracy: float
    loss: float
    wall_s: float
    strategy: dict[str, Adapter]
    server: dict[str, Any] | None
