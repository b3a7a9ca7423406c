"""Each device at its own cut: the fixed, memory and joint split policies on a three-class fleet, over seeds.

Run: .venv/bin/python benchmarks/cut_policies.py [--config configs/fleet-3class-cuts.yaml] [--seeds 3]
     [--policies fixed memory joint] [--out benchmarks/results/cut_policies.md] [key=value ...]
Every policy runs the config (sflam's allocation, nf4 device weights, 8-bit smashed data) with seeds seed, seed + 1,
...; the table gives the mean and 95 % Student-t interval over the seeds of the test accuracy, the simulated round
latency and device energy, the deepest device-part peak any device of the fleet runs (the measured peak at its
cut), the mean cut of the devices that trained, and the devices whose class budget the run's cut exceeds (under
`fixed` the devices a fixed cut would have to exclude; the run itself trains them regardless, so its accuracy is
an upper bound for a fleet that leaves them out). Each run's summary is written beside the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sflam.pipelines.seeds import aggregate, seed_configs, with_ci
from sflam.pipelines.train import run_experiment
from sflam.platform.assembly import Experiment
from sflam.platform.build import quiet_libraries
from sflam.platform.config import load_config
from sflam.platform.results import RunResult


def row(policy: str, result: RunResult, peaks: dict[int, int]) -> dict[str, Any]:
    """`peaks`: the measured device-part peak at each candidate cut."""
    summary = result.summary()
    classes = summary.get("device_classes") or {}
    cuts = [c for r in result.rounds if r.plan is not None for c in (r.plan.cuts or ())]
    # the deepest peak a device ran: at the fixed cut, or at the deepest cut any device was given
    peak = summary["device_memory_bytes"] if policy == "fixed" else peaks[max(cuts)]
    mean_cut = float(np.mean(cuts)) if cuts else float(result.config["split.cut_layer"])
    return {"policy": policy, "accuracy": summary["accuracy"], "round_latency_s": summary["round_latency_s"],
            "energy_j": summary["energy_j"], "peak_mib": peak / 2**20, "mean_cut": mean_cut,
            "devices_over_memory": summary.get("devices_over_memory") or 0, "classes": classes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fleet-3class-cuts.yaml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=["fixed", "memory", "joint"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cut_policies.md"))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args()
    quiet_libraries()
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    probe = load_config(args.config, [*args.overrides, "split.policy=memory"])
    peaks = Experiment.build(probe).planner.memory_by_cut  # measured once (the cost cache keeps it)
    for policy in args.policies:
        config = load_config(args.config, [*args.overrides, f"split.policy={policy}"])
        per_seed = []
        for seed_config in seed_configs(config, args.seeds):
            started = time.perf_counter()
            result = run_experiment(seed_config)
            one = row(policy, result, peaks)
            per_seed.append({k: v for k, v in one.items() if k != "classes"})
            runs.append({**one, "seed": seed_config.seed})
            print(f"{policy} seed {seed_config.seed}: accuracy {one['accuracy']:.4f}, latency "
                  f"{one['round_latency_s']:.3g} s, energy {one['energy_j']:.3g} J, peak {one['peak_mib']:.1f} MiB, "
                  f"mean cut {one['mean_cut']:.2f}, over memory {one['devices_over_memory']} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        rows.append(aggregate(per_seed))
    lines = ["| policy | test accuracy | round latency (s) | device energy per round (J) | deepest device-part peak "
             "(MiB) | mean cut | devices over their budget |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {with_ci(r, 'accuracy', '.4f')} | {with_ci(r, 'round_latency_s', '.3g')} | "
                     f"{with_ci(r, 'energy_j', '.3g')} | {r['peak_mib']:.1f} | {with_ci(r, 'mean_cut', '.2f')} | "
                     f"{r['devices_over_memory']:.0f} |")
    command = (f".venv/bin/python benchmarks/cut_policies.py --config {args.config} --seeds {args.seeds} --policies "
               f"{' '.join(args.policies)} --out {args.out}" + "".join(f" {o}" for o in args.overrides))
    text = f"Command: {command}\n\n" + "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".md.tmp")
    partial.write_text(text)
    partial.replace(args.out)  # atomic
    args.out.with_suffix(".json").write_text(json.dumps(runs, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
