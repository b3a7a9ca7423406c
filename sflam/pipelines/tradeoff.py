"""The latency–energy trade-off of one round of the configured scenario: sweep λ, plot the Pareto front.

Each point is the joint allocation (bits, power, bandwidth) for one λ in [0, 1] on the same round: the
same devices, channels and real mini-batches. The plot marks the physical floors of docs/concepts/system-model.md
(no round
is faster than every device at full band and full power; no uplink spends less than N0 ln2 / g per
bit) and the equal-allocation baseline.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sflam.pipelines.figures import save_figure
from sflam.platform.allocation import Allocation, AllocationProblem, allocate, equal_allocation, reference_costs
from sflam.platform.assembly import Experiment
from sflam.platform.config import ExperimentConfig
from sflam.platform.files import atomic_path
from sflam.platform.participation import round_indices, round_shapes, select_devices
from sflam.platform.system import LN2


@dataclass(frozen=True, kw_only=True)
class TradeoffPoint:
    """One allocation on the front."""

    lam: float
    round_latency_s: float
    energy_j: float
    comm_latency_s: float
    bits_mean: float
    objective: float


@dataclass(frozen=True, kw_only=True)
class TradeoffResult:
    points: list[TradeoffPoint]
    latency_floor_s: float
    energy_floor_j: float
    equal: TradeoffPoint
    csv_path: Path
    plot_path: Path

    def as_json(self) -> list[dict[str, float]]:
        return [{"lambda": p.lam, "round_latency_s": p.round_latency_s, "energy_j": p.energy_j,
                 "comm_latency_s": p.comm_latency_s, "bits_mean": p.bits_mean} for p in self.points]


def floors(problem: AllocationProblem, bits_index: np.ndarray) -> tuple[float, float]:
    """(round latency floor, device energy floor) of a lockstep round at given bits (docs/concepts/system-model.md).

    Latency: every transmission of every stage on the whole band at full power (no device can be faster);
    energy: the compute energy plus every uplink bit at N0 ln2 / g (infinite time).
    """
    uplink = problem.stage_uplink(bits_index)
    B, g, n0 = problem.bandwidth_hz, problem.gain[:, None], problem.n0
    up = uplink / (B * np.log2(1 + problem.max_power_w * g / (n0 * B)))
    down = problem.downlink_bits / (B * np.log2(1 + problem.server_power_w * g / (n0 * B)))
    latency = float(np.sum(np.max(problem.compute_s + up + down, axis=0)) + problem.server_s)
    energy = float(np.sum(problem.compute_energy_j) + np.sum(uplink * n0 * LN2 / g))
    return latency, energy


def comm_latency_s(problem: AllocationProblem, allocation: Allocation) -> float:
    """The time the radio adds to the round: the makespan minus the makespan with instantaneous transmissions."""
    return allocation.round_latency_s - float(np.sum(np.max(problem.compute_s, axis=0)) + problem.server_s)


def run_tradeoff(config: ExperimentConfig, points: int = 21, experiment: Experiment | None = None,
                 out_dir: Path | None = None) -> TradeoffResult:
    exp = experiment or Experiment.build(config)
    selected = select_devices(config.seed, 0, config.data.num_devices, config.train.devices_per_round)
    shapes = round_shapes(exp.data, round_indices(config, exp.data, 0, selected))
    front: list[TradeoffPoint] = []
    problem = None
    for lam in np.linspace(0.0, 1.0, points):
        problem = exp.planner.problem(0, selected, shapes, lam=float(lam))
        a = allocate(problem, config.allocation.bits_search)
        front.append(TradeoffPoint(lam=float(lam), round_latency_s=a.round_latency_s, energy_j=a.total_energy_j,
                                   comm_latency_s=comm_latency_s(problem, a), bits_mean=float(np.mean(a.bits)),
                                   objective=a.objective))
    assert problem is not None
    ref = reference_costs(problem)
    eq = equal_allocation(problem, config.quant.activation_bits, ref)
    equal = TradeoffPoint(lam=float("nan"), round_latency_s=eq.round_latency_s, energy_j=eq.total_energy_j,
                          comm_latency_s=comm_latency_s(problem, eq), bits_mean=float(config.quant.activation_bits),
                          objective=eq.objective)
    lowest_bits = np.full(problem.size, int(np.argmin(problem.bits_options)))
    latency_floor, energy_floor = floors(problem, lowest_bits)
    target = out_dir or Path(config.output_dir) / config.name
    target.mkdir(parents=True, exist_ok=True)
    csv_path = target / "tradeoff.csv"
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(front[0])))
        writer.writeheader()
        for point in front:
            writer.writerow(asdict(point))
    plot_path = target / "tradeoff.png"
    plot_front(front, equal, latency_floor, energy_floor, plot_path,
               title=f"{config.name}: latency–energy trade-off, {problem.size} devices, one round")
    return TradeoffResult(points=front, latency_floor_s=latency_floor, energy_floor_j=energy_floor, equal=equal,
                          csv_path=csv_path, plot_path=plot_path)


def plot_front(front: list[TradeoffPoint], equal: TradeoffPoint, latency_floor: float, energy_floor: float,
               path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=120)
    latency = [p.round_latency_s for p in front]
    energy = [p.energy_j for p in front]
    ax.plot(latency, energy, "o-", color="tab:blue", label="joint allocation (λ from 0 to 1)")
    for p in (front[0], front[len(front) // 2], front[-1]):
        ax.annotate(f"λ={p.lam:.2g}", (p.round_latency_s, p.energy_j), textcoords="offset points", xytext=(6, 6),
                    fontsize=8)
    ax.plot([equal.round_latency_s], [equal.energy_j], "s", color="tab:red", markersize=8,
            label="equal bandwidth, full power")
    ax.axvline(latency_floor, color="0.4", linestyle="--",
               label=f"latency floor {latency_floor:.3g} s (lowest bits, whole band, full power)")
    ax.axhline(energy_floor, color="0.4", linestyle=":",
               label=f"energy floor {energy_floor:.3g} J (compute + N0 ln2 / g per bit)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("round latency T (s)")
    ax.set_ylabel("device energy per round E (J)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def format_front(result: TradeoffResult) -> str:
    lines = [f"{'lambda':>7} {'latency s':>11} {'energy J':>11} {'comm s':>10} {'bits':>6}", "-" * 49]
    for p in result.points:
        lines.append(f"{p.lam:>7.2f} {p.round_latency_s:>11.4g} {p.energy_j:>11.4g} {p.comm_latency_s:>10.4g} "
                     f"{p.bits_mean:>6.3g}")
    equal = result.equal
    lines.append(f"equal allocation: latency {equal.round_latency_s:.4g} s, energy {equal.energy_j:.4g} J")
    lines.append(f"floors: latency {result.latency_floor_s:.4g} s, energy {result.energy_floor_j:.4g} J")
    lines.append(f"wrote {result.csv_path} and {result.plot_path}")
    return "\n".join(lines)
