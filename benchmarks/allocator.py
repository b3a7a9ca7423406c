"""Allocator benchmark: wall time against the number of devices, and the gap to brute force over bits.

Run: .venv/bin/python benchmarks/allocator.py [--sizes 10 100 1000 10000] [--repeats 3]
Instances: DESIGN §6 defaults (20 MHz, 0.2 W, 50-500 m, Rayleigh), real codec payloads of 384-wide
smashed data, bits {2,4,8,16,32}, distortion budget = all devices at 8 bits, lambda = 0.5.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from sflam.platform.allocation import allocate, distortion, equal_allocation, reference_costs, solve_power_bandwidth
from sflam.platform.scenarios import random_problem


def timing(sizes: list[int], repeats: int) -> None:
    print("| devices | allocate (ms, median) | power/bandwidth block (ms) | objective vs equal 8-bit |")
    print("|---:|---:|---:|---:|")
    for K in sizes:
        problem = random_problem(K, seed=K)
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
        print(f"| {K} | {1e3 * np.median(times):.0f} | {1e3 * np.median(block):.0f} | "
              f"{alloc.objective / equal.objective:.3f} |", flush=True)


def brute_force_gap(instances: int) -> None:
    print("\n| devices | instances | mean gap to brute force | worst gap |")
    print("|---:|---:|---:|---:|")
    for K in (3, 4, 5):
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
        print(f"| {K} | {instances} | {100 * np.mean(gaps):.3f}% | {100 * np.max(gaps):.3f}% |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instances", type=int, default=5)
    args = parser.parse_args()
    timing(args.sizes, args.repeats)
    brute_force_gap(args.instances)


if __name__ == "__main__":
    main()
