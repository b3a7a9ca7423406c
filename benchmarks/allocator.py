"""Allocator benchmark: wall time against the number of devices, and the gap to brute force over bits.

Run: .venv/bin/python benchmarks/allocator.py [--sizes 10 100 1000 10000] [--repeats 3]
Instances: docs/concepts/system-model.md defaults (20 MHz, 0.2 W, 50-500 m, Rayleigh), a lockstep round of 2 local steps
(3 stages), real codec payloads of 384-wide smashed data, bits {2,4,8,16,32}, distortion budget = an
average of 6 bits (the default), lambda = 0.5. Writes benchmarks/results/allocator.md.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from sflam.platform.allocation import allocate, distortion, equal_allocation, reference_costs, solve_power_bandwidth
from sflam.platform.scenarios import random_problem

LINES: list[str] = []


def emit(line: str) -> None:
    LINES.append(line)
    print(line, flush=True)


def timing(sizes: list[int], repeats: int) -> None:
    emit("| devices | allocate (ms, median) | power/bandwidth block (ms) | objective vs equal 8-bit | distinct bits |")
    emit("|---:|---:|---:|---:|---:|")
    for K in sizes:
        problem = random_problem(K, seed=K, budget_bits=6)
        ref = reference_costs(problem)
        times, block = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            alloc = allocate(problem)
            times.append(time.perf_counter() - started)
            started = time.perf_counter()
            solve_power_bandwidth(problem, np.full(K, problem.option_index(8)), ref)
            block.append(time.perf_counter() - started)
        equal = equal_allocation(problem, 8, ref)
        emit(f"| {K} | {1e3 * np.median(times):.0f} | {1e3 * np.median(block):.0f} | "
             f"{alloc.objective / equal.objective:.3f} | {len(set(alloc.bits.tolist()))} |")


def brute_force_gap(instances: int) -> None:
    emit("")
    emit("| devices | instances | mean gap to brute force | worst gap |")
    emit("|---:|---:|---:|---:|")
    for K in (3, 4):
        gaps = []
        for seed in range(instances):
            problem = random_problem(K, seed=100 + seed, lam=float(np.linspace(0.1, 0.9, instances)[seed]),
                                     bits=(2, 4, 8, 32), budget_bits=4 + seed % 3)
            ref = reference_costs(problem)
            best = np.inf
            for combo in itertools.product(range(4), repeat=K):
                idx = np.array(combo)
                if np.sum(problem.distortion_weight * distortion(problem.bits_options[idx])) > \
                        problem.distortion_budget * (1 + 1e-12):
                    continue
                best = min(best, solve_power_bandwidth(problem, idx, ref).objective)
            gaps.append(allocate(problem).objective / best - 1)
        emit(f"| {K} | {instances} | {100 * np.mean(gaps):.3f}% | {100 * np.max(gaps):.3f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instances", type=int, default=5)
    args = parser.parse_args()
    timing(args.sizes, args.repeats)
    brute_force_gap(args.instances)
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "allocator.md").write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
