"""The power/bandwidth block of a round for fixed bits: its stages under a deadline, and the equal baseline."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from sflam.platform.allocation.links import BlockSolution, Links
from sflam.platform.allocation.ofdma import equal_counts, match_stage
from sflam.platform.allocation.problem import Allocation, AllocationError, AllocationProblem
from sflam.platform.allocation.stage import min_latency, solve_stage


@dataclass
class Stages:
    """The stages of a round for fixed bits, with what does not change while the latency price moves."""

    links: list[Links]
    T_min: np.ndarray
    cap: float


HINTS = ("T_hint", "T_min_hint", "nu_hint", "b_hint", "bmin_hint")


def stages_of(problem: AllocationProblem, uplink: np.ndarray, ref: tuple[float, float],
            hints: dict[int, dict[str, object]] | None = None) -> Stages:
    T0, E0 = ref
    weights = (problem.lam / T0, (1.0 - problem.lam) / E0)
    allowed = np.inf if problem.energy_cap_j is None else problem.energy_cap_j
    spare_energy = allowed - problem.compute_energy_j
    total_up = np.maximum(uplink.sum(axis=1), 1e-300)
    # an energy cap is shared among the stages in proportion to their uplink bits
    with np.errstate(invalid="ignore"):  # no cap: inf * 0 in stages without uplink, replaced by inf
        caps = [np.where(np.isfinite(spare_energy), spare_energy * uplink[:, j] / total_up, np.inf)
                for j in range(problem.stages)]
    links = [Links(problem, uplink[:, j], problem.downlink_bits[:, j], problem.compute_s[:, j], caps[j], weights)
             for j in range(problem.stages)]
    for j, lk in enumerate(links):  # warm starts from the same stage under nearby bits
        for name, value in (hints or {}).get(j, {}).items():
            setattr(lk, name, value)
    cap = problem.deadline_s if problem.deadline_s is not None else problem.max_latency_factor * T0
    T_min = np.array([float(np.max(lk.c)) if lk.idle else min_latency(lk, cap) for lk in links])
    if float(T_min.sum()) + problem.server_s > cap * (1 + 1e-12):
        raise AllocationError(f"no allocation finishes the round within {cap:.4g} s (the least is "
                              f"{float(T_min.sum()) + problem.server_s:.4g} s); raise allocation.deadline_s")
    return Stages(links, T_min, cap)


def solve_stages(stages: Stages, server_s: float, extra_weight: float) -> list[BlockSolution]:
    spare = stages.cap - server_s - float(stages.T_min.sum())
    out = []
    for links, T_min in zip(stages.links, stages.T_min, strict=True):
        if links.idle:
            K = links.g.shape[0]
            out.append(BlockSolution(T_min, np.full(K, links.p.bandwidth_hz / K), np.zeros(K), 0.0))
            continue
        base = links.weights
        links.weights = (base[0] + extra_weight, base[1])
        try:
            out.append(solve_stage(links, T_min, T_min + spare))
        finally:
            links.weights = base
    return out


def solve_block(problem: AllocationProblem, uplink: np.ndarray, ref: tuple[float, float],
                 hints: dict[int, dict[str, object]] | None = None) -> tuple[list[BlockSolution], Stages, float]:
    """Every stage for fixed bits; a latency price eta >= 0 keeps the makespan within the deadline (or cap).

    Returns the stages' solutions, the stages and eta. `hints` (per stage: the last stage length, price and
    shares) warm-starts the searches and is updated with this solution's."""
    stages = stages_of(problem, uplink, ref, hints)
    try:
        return solve_block_stages(problem, stages, ref)
    finally:
        if hints is not None:
            for j, lk in enumerate(stages.links):
                hints[j] = {name: getattr(lk, name) for name in HINTS}


def solve_block_stages(problem: AllocationProblem, stages: Stages, ref: tuple[float, float]
                        ) -> tuple[list[BlockSolution], Stages, float]:
    def total(sols: list[BlockSolution]) -> float:
        return float(sum(s.T for s in sols)) + problem.server_s

    if problem.lam > 0:
        sols = solve_stages(stages, problem.server_s, 0.0)
        if total(sols) <= stages.cap * (1 + 1e-9):
            return sols, stages, 0.0
    # the deadline binds: raise the price of time until the stages fit (the makespan falls as eta rises)
    T0 = ref[0]
    hi = 1.0 / T0
    sols = solve_stages(stages, problem.server_s, hi)
    while total(sols) > stages.cap * (1 + 1e-9):
        hi *= 4.0
        sols = solve_stages(stages, problem.server_s, hi)
    seen: dict[float, list[BlockSolution]] = {np.log(hi): sols}

    def excess(log_eta: float) -> float:  # falls as eta rises; the root is where the makespan meets the cap
        if log_eta not in seen:
            seen[log_eta] = solve_stages(stages, problem.server_s, float(np.exp(log_eta)))
        return float(np.log(total(seen[log_eta])) - np.log(stages.cap))

    low = float(np.log(hi * 1e-12))
    if excess(low) <= 0:
        return seen[low], stages, float(np.exp(low))
    root = brentq(excess, low, float(np.log(hi)), xtol=1e-5, rtol=1e-9)
    for step in range(40):  # step onto the feasible side of the root
        if excess(root) <= np.log1p(1e-9):
            break
        root += 1e-5 * 2.0**step
    return seen[root], stages, float(np.exp(root))


def solve_power_bandwidth(problem: AllocationProblem, bits_index: np.ndarray,
                          reference: tuple[float, float] | None = None,
                          hints: dict[int, dict[str, object]] | None = None) -> Allocation:
    """The optimal power and bandwidth for fixed bits (the convex block), as a full allocation; with OFDMA,
    whole subchannels matched from the continuous optimum (its objective is then a lower bound). `hints`
    carries warm starts between calls for nearby bits (block coordinate descent)."""
    ref = reference or reference_costs(problem)
    uplink = problem.stage_uplink(np.asarray(bits_index))
    bits = problem.bits_options[np.asarray(bits_index)]
    sols, stages, eta = solve_block(problem, uplink, ref, hints)
    links = [Links(problem, uplink[:, j], problem.downlink_bits[:, j], problem.compute_s[:, j],
                    np.full(problem.size, np.inf), (0.0, 0.0)) for j in range(problem.stages)]
    relaxed = assemble(problem, links, bits, sols, ref)
    if problem.subchannels is None:
        return relaxed

    N = problem.subchannels
    spare = stages.cap - problem.server_s - float(stages.T_min.sum())
    matched, counts = [], np.zeros((problem.size, problem.stages), dtype=np.int64)
    for j, (lk, sol, T_min) in enumerate(zip(stages.links, sols, stages.T_min, strict=True)):
        if lk.idle:
            counts[:, j] = equal_counts(problem.size, N)
            matched.append(BlockSolution(sol.T, counts[:, j] * problem.bandwidth_hz / N, sol.uplink_energy, 0.0))
            continue
        base = lk.weights
        lk.weights = (base[0] + eta, base[1])
        try:
            solution, counts[:, j] = match_stage(lk, sol, N, T_min + spare)
        finally:
            lk.weights = base
        matched.append(solution)
    if float(sum(s.T for s in matched)) + problem.server_s > stages.cap * (1 + 1e-9):
        raise AllocationError(f"whole subchannels miss the round deadline of {stages.cap:.4g} s; raise "
                              "allocation.deadline_s or system.subchannels")
    whole = assemble(problem, links, bits, matched, ref)
    return dataclasses.replace(whole, stage_subchannels=counts, relaxation_gap=whole.objective / relaxed.objective - 1)


def assemble(problem: AllocationProblem, links: list[Links], bits: np.ndarray, sols: list[BlockSolution],
              ref: tuple[float, float]) -> Allocation:
    K, J = problem.size, problem.stages
    power, band, up, down, busy = (np.zeros((K, J)) for _ in range(5))
    for j, (lk, sol) in enumerate(zip(links, sols, strict=True)):
        b = sol.bandwidth
        d = lk.downlink_s(b)
        tau = np.where(lk.S > 0, sol.T - lk.c - d, 0.0)
        p = np.minimum(lk.power(tau, b), problem.max_power_w)
        tau = np.maximum(tau, lk.full_power_s(b))  # rounding at the cap: never faster than full power
        power[:, j], band[:, j], up[:, j], down[:, j] = p, b, tau, d
        busy[:, j] = lk.c + d + tau
    return priced(problem, bits, power, band, up, down, busy, ref)


def priced(problem: AllocationProblem, bits: np.ndarray, power: np.ndarray, band: np.ndarray, up: np.ndarray,
            down: np.ndarray, busy: np.ndarray, ref: tuple[float, float]) -> Allocation:
    """Costs of a stage-by-stage plan under the lockstep: stages last as long as their slowest device."""
    stage = busy.max(axis=0)
    T = float(stage.sum()) + problem.server_s
    finish = float(stage[:-1].sum()) + problem.server_s + busy[:, -1]
    up_energy = (power * up).sum(axis=1)
    energy = problem.compute_energy_j + up_energy
    total = float(energy.sum())
    objective = problem.lam * T / ref[0] + (1 - problem.lam) * total / ref[1]
    return Allocation(bits=np.asarray(bits, dtype=np.int64).copy(), stage_power_w=power, stage_bandwidth_hz=band,
                      uplink_s=up, downlink_s=down, stage_s=stage, latency_s=finish, uplink_energy_j=up_energy,
                      energy_j=energy, round_latency_s=T, total_energy_j=total, objective=objective, reference=ref)


# --------------------------------------------------------------------------- baselines and reference


def equal_allocation(problem: AllocationProblem, bits: int | np.ndarray,
                     reference: tuple[float, float] | None = None, uplink_bits: np.ndarray | None = None
                     ) -> Allocation:
    """Equal bandwidth B/K in every stage, full power, fixed bits: the baselines' allocation."""
    K = problem.size
    bits_arr = np.broadcast_to(np.asarray(bits, dtype=np.int64), (K,))
    if uplink_bits is None:
        uplink_bits = problem.stage_uplink(np.array([problem.option_index(int(q)) for q in bits_arr]))
    counts = None
    if problem.subchannels is None:
        b = np.full((K, problem.stages), problem.bandwidth_hz / K)
    else:

        counts = np.repeat(equal_counts(K, problem.subchannels)[:, None], problem.stages, axis=1)
        b = counts * (problem.bandwidth_hz / problem.subchannels)
    power, up, down = np.zeros_like(b), np.zeros_like(b), np.zeros_like(b)
    for j in range(problem.stages):
        lk = Links(problem, uplink_bits[:, j], problem.downlink_bits[:, j], problem.compute_s[:, j],
                   np.full(K, np.inf), (0.0, 0.0))
        up[:, j], down[:, j] = lk.full_power_s(b[:, j]), lk.downlink_s(b[:, j])
        power[:, j] = np.where(lk.S > 0, problem.max_power_w, 0.0)
    busy = problem.compute_s + up + down
    allocation = priced(problem, bits_arr, power, b, up, down, busy, reference or (1.0, 1.0))
    if reference is None:  # its own reference: objective 1
        allocation = priced(problem, bits_arr, power, b, up, down, busy,
                             (allocation.round_latency_s, allocation.total_energy_j))
    return dataclasses.replace(allocation, stage_subchannels=counts)


def reference_costs(problem: AllocationProblem) -> tuple[float, float]:
    """(T0, E0): round latency and energy of the equal fp32 allocation."""
    raw = equal_allocation(problem, 32, reference=(1.0, 1.0), uplink_bits=problem.raw_uplink_bits)
    return raw.round_latency_s, raw.total_energy_j
