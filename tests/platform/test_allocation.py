"""The allocator (DESIGN §7): feasibility, optimality against scipy and brute force, the λ extremes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import brentq, minimize

from sflam.platform.allocation import (
    AllocationProblem,
    allocate,
    distortion,
    equal_allocation,
    reference_costs,
    solve_power_bandwidth,
)
from sflam.platform.scenarios import random_problem
from sflam.platform.system import LN2, energy_per_bit_floor, noise_w_per_hz

N0 = noise_w_per_hz(-174.0)
B, P_MAX, P_S = 20e6, 0.2, 1.0


def make_problem(K: int, seed: int = 0, **kwargs) -> AllocationProblem:
    return random_problem(K, seed, **kwargs)


def assert_feasible(problem: AllocationProblem, alloc, check_distortion: bool = True) -> None:
    rel = 1e-7
    assert alloc.bandwidth_hz.sum() <= B * (1 + rel)
    assert np.all(alloc.bandwidth_hz > 0)
    assert np.all(alloc.power_w >= 0) and np.all(alloc.power_w <= P_MAX * (1 + rel))
    assert set(alloc.bits.tolist()) <= set(problem.bits_options.tolist())
    used = float(np.sum(problem.distortion_weight * distortion(alloc.bits)))
    assert used <= problem.distortion_budget * (1 + 1e-9) or not check_distortion
    # the plan delivers every payload: rate x time >= bits, up and down
    idx = np.array([problem.option_index(int(q)) for q in alloc.bits])
    up_bits = problem.uplink_bits[np.arange(problem.size), idx]
    b, p, g = alloc.bandwidth_hz, alloc.power_w, problem.gain
    assert np.all(b * np.log2(1 + p * g / (N0 * b)) * alloc.uplink_s >= up_bits * (1 - rel))
    assert np.all(b * np.log2(1 + P_S * g / (N0 * b)) * alloc.downlink_s >= problem.downlink_bits * (1 - rel))
    assert np.allclose(alloc.latency_s, problem.fixed_latency_s + alloc.uplink_s + alloc.downlink_s)
    assert alloc.round_latency_s == pytest.approx(alloc.latency_s.max())
    if problem.deadline_s is not None:
        assert alloc.round_latency_s <= problem.deadline_s * (1 + rel)
    if problem.energy_cap_j is not None:
        assert np.all(alloc.energy_j <= problem.energy_cap_j * (1 + rel))
    assert np.allclose(alloc.energy_j, problem.compute_energy_j + p * alloc.uplink_s)


def scipy_block(problem: AllocationProblem, bits_index: np.ndarray, ref: tuple[float, float]) -> float:
    """The power/bandwidth block for fixed bits, solved by a generic solver (SLSQP) over (tau, b, T)."""
    K = problem.size
    T0, E0 = ref
    S = problem.uplink_bits[np.arange(K), bits_index]
    g, c = problem.gain, problem.fixed_latency_s
    horizon = problem.deadline_s or problem.max_latency_factor * T0

    def unpack(z):
        return z[:K] * T0, z[K:2 * K] * B, z[-1] * T0

    def power(tau, b):
        return N0 * b / g * np.expm1(np.minimum(S / (tau * b), 1000) * LN2)

    def downlink(b):
        return problem.downlink_bits / (b * np.log2(1 + P_S * g / (N0 * b)))

    def objective(z):
        tau, b, T = unpack(z)
        energy = problem.compute_energy_j.sum() + np.sum(power(tau, b) * tau)
        return problem.lam * T / T0 + (1 - problem.lam) * energy / E0

    constraints = [
        {"type": "ineq", "fun": lambda z: (unpack(z)[2] - c - unpack(z)[0] - downlink(unpack(z)[1])) / T0},
        {"type": "ineq", "fun": lambda z: 1 - z[K:2 * K].sum()},
        {"type": "ineq", "fun": lambda z: 1 - power(unpack(z)[0], unpack(z)[1]) / P_MAX},
    ]
    b0 = np.full(K, B / K)
    tau0 = S / (b0 * np.log2(1 + P_MAX * g / (N0 * b0)))
    T_start = float(np.max(c + tau0 + downlink(b0)))
    best = np.inf
    for stretch in (1.0, 1.5, 3.0):  # a few starts: equal allocation, and with slack to spend
        z0 = np.concatenate([(tau0 + (stretch - 1) * T_start) / T0, b0 / B, [stretch * T_start / T0]])
        bounds = [(1e-9, None)] * K + [(1e-9, 1.0)] * K + [(0, horizon / T0)]
        result = minimize(objective, z0, method="SLSQP", bounds=bounds, constraints=constraints,
                          options={"maxiter": 2000, "ftol": 1e-14})
        tau, b, T = unpack(result.x)
        ok = (np.all(c + tau + downlink(b) <= T * (1 + 1e-6)) and b.sum() <= B * (1 + 1e-6)
              and np.all(power(tau, b) <= P_MAX * (1 + 1e-6)))
        if ok:
            best = min(best, float(result.fun))
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("lam", [0.2, 0.5, 0.9])
def test_power_bandwidth_block_matches_a_generic_solver(seed: int, lam: float) -> None:
    problem = make_problem(4, seed=seed, lam=lam)
    ref = reference_costs(problem)
    bits_index = np.random.default_rng(seed).integers(1, len(problem.bits_options), problem.size)
    ours = solve_power_bandwidth(problem, bits_index, ref)
    assert_feasible(problem, ours, check_distortion=False)
    generic = scipy_block(problem, bits_index, ref)
    assert np.isfinite(generic)
    assert ours.objective <= generic * (1 + 1e-3), (ours.objective, generic)


def brute_force(problem: AllocationProblem) -> float:
    ref = reference_costs(problem)
    best = np.inf
    Q = len(problem.bits_options)
    for combo in itertools.product(range(Q), repeat=problem.size):
        idx = np.array(combo)
        used = np.sum(problem.distortion_weight * distortion(problem.bits_options[idx]))
        if used > problem.distortion_budget * (1 + 1e-12):
            continue
        best = min(best, solve_power_bandwidth(problem, idx, ref).objective)
    return best


@pytest.mark.parametrize(("K", "seed", "lam", "bits", "budget"), [
    (2, 0, 0.5, (2, 4, 8, 32), 4), (3, 1, 0.3, (2, 4, 8, 32), 6), (4, 2, 0.7, (2, 4, 8, 32), 4),
    (5, 3, 0.5, (4, 8, 32), 6), (6, 4, 0.9, (4, 8, 32), 6), (6, 5, 0.2, (2, 8, 32), 8),
])
def test_joint_allocation_is_within_one_percent_of_brute_force(K: int, seed: int, lam: float, bits: tuple[int, ...],
                                                                budget: int) -> None:
    problem = make_problem(K, seed=seed, lam=lam, bits=bits, budget_bits=budget)
    alloc = allocate(problem)
    assert_feasible(problem, alloc)
    assert alloc.objective <= brute_force(problem) * 1.01


def test_exhaustive_search_equals_brute_force() -> None:
    problem = make_problem(3, seed=7, lam=0.5, bits=(2, 4, 8, 32), budget_bits=4)
    assert allocate(problem, search="exhaustive").objective == pytest.approx(brute_force(problem), rel=1e-9)


def test_lambda_one_attains_the_minimum_round_latency() -> None:
    """Independently: at full power the least T is where the minimum bandwidths just fill the band."""
    problem = make_problem(8, seed=3, lam=1.0, bits=(8,), budget_bits=8)
    alloc = allocate(problem)
    assert_feasible(problem, alloc)
    S, Sd, g, c = problem.uplink_bits[:, 0], problem.downlink_bits, problem.gain, problem.fixed_latency_s

    def time_at(b, k):
        return S[k] / (b * np.log2(1 + P_MAX * g[k] / (N0 * b))) + Sd[k] / (b * np.log2(1 + P_S * g[k] / (N0 * b)))

    def needed(T):
        total = 0.0
        for k in range(problem.size):
            if time_at(B, k) > T - c[k]:
                return np.inf
            total += brentq(lambda b, k=k: time_at(b, k) - (T - c[k]), 1e-6, B, xtol=1e-9, rtol=1e-14)
        return total

    lo = float(np.max(c))
    hi = float(equal_allocation(problem, 8).round_latency_s)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if needed(mid) > B else (lo, mid)
    assert alloc.round_latency_s == pytest.approx(hi, rel=1e-6)
    assert alloc.round_latency_s < equal_allocation(problem, 8).round_latency_s


def test_small_lambda_approaches_the_uplink_energy_floor() -> None:
    problem = make_problem(5, seed=2, lam=1e-9, bits=(8,), max_latency_factor=1e4)
    alloc = allocate(problem)
    assert_feasible(problem, alloc)
    per_bit = alloc.uplink_energy_j / problem.uplink_bits[:, 0]
    floor = energy_per_bit_floor(problem.gain, N0)
    assert np.all(per_bit >= floor * (1 - 1e-9))
    assert np.all(per_bit <= floor * 1.05)
    # and with a moderate lambda it is further from the floor
    moderate = allocate(make_problem(5, seed=2, lam=0.5, bits=(8,)))
    assert np.mean(moderate.uplink_energy_j / problem.uplink_bits[:, 0] / floor) > np.mean(per_bit / floor)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
def test_never_worse_than_equal_allocation(seed: int, lam: float) -> None:
    problem = make_problem(12, seed=seed, lam=lam)
    ref = reference_costs(problem)
    alloc = allocate(problem)
    assert_feasible(problem, alloc)
    for bits in (8, 16, 32):
        assert alloc.objective <= equal_allocation(problem, bits, ref).objective * (1 + 1e-9)


def test_deadline_and_energy_caps_hold() -> None:
    loose = allocate(make_problem(6, seed=1, lam=0.0))
    deadline = 0.6 * loose.round_latency_s
    capped = make_problem(6, seed=1, lam=0.0, deadline_s=deadline, energy_cap_j=float(loose.energy_j.max()) * 1.5)
    alloc = allocate(capped)
    assert_feasible(capped, alloc)
    assert alloc.round_latency_s <= deadline * (1 + 1e-7)
    from sflam.platform.allocation import AllocationError

    with pytest.raises(AllocationError, match="deadline"):
        allocate(make_problem(6, seed=1, lam=0.5, deadline_s=1e-6))


def test_reference_is_the_equal_fp32_allocation() -> None:
    problem = make_problem(5, seed=0)
    T0, E0 = reference_costs(problem)
    raw = equal_allocation(problem, 32, reference=(T0, E0))
    assert (raw.round_latency_s, raw.total_energy_j) == pytest.approx((T0, E0))
    assert raw.objective == pytest.approx(1.0)
