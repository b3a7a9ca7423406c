"""The bits block and the joint allocation: block coordinate descent over bits and (power, bandwidth)."""

from __future__ import annotations

import heapq
import itertools
import math

import numpy as np

from sflam.platform.allocation.block import reference_costs, solve_power_bandwidth
from sflam.platform.allocation.links import Links
from sflam.platform.allocation.problem import Allocation, AllocationError, AllocationProblem, distortion
from sflam.platform.config import EXHAUSTIVE_LIMIT

# --------------------------------------------------------------------------- the bits block


def indices(problem: AllocationProblem, bits: np.ndarray) -> np.ndarray:
    """Bit widths -> their positions in the options."""
    order = np.argsort(problem.bits_options)
    return order[np.searchsorted(problem.bits_options[order], bits)]


def feasible_bits(problem: AllocationProblem, idx: np.ndarray) -> bool:
    d = float(np.sum(problem.distortion_weight * distortion(problem.bits_options[idx])))
    return d <= problem.distortion_budget * (1 + 1e-12)


def start_bits(problem: AllocationProblem) -> np.ndarray:
    """The cheapest uniform bit width that meets the distortion budget."""
    order = np.argsort(problem.bits_options)
    for j in order:
        idx = np.full(problem.size, j)
        if feasible_bits(problem, idx):
            return idx
    raise AllocationError("no bit width meets the distortion budget: add 32 to allocation.bits")


def bits_block(problem: AllocationProblem, current: Allocation) -> np.ndarray:
    """Bits given the stages' (b, m): each device's uplink energy per bit option, a distortion price, then greedy."""
    K, Q = problem.size, len(problem.bits_options)
    cost = np.zeros((K, Q))
    for q in range(Q):
        for j in range(problem.stages):
            lk = Links(problem, problem.uplink_bits[:, j, q], problem.downlink_bits[:, j], problem.compute_s[:, j],
                       np.full(K, np.inf), (0.0, 0.0))
            b = current.stage_bandwidth_hz[:, j]
            tau = current.stage_s[j] - lk.c - lk.downlink_s(b)
            ok = tau >= lk.full_power_s(b) * (1 - 1e-12)
            e = lk.energy(np.maximum(tau, 1e-300), b)
            cost[:, q] += np.where(ok, e, np.inf)
    if problem.energy_cap_j is not None:
        cost = np.where(cost + problem.compute_energy_j[:, None] <= problem.energy_cap_j * (1 + 1e-9), cost, np.inf)
    weight = problem.distortion_weight[:, None] * distortion(problem.bits_options)[None, :]

    rows = np.arange(K)
    budget = problem.distortion_budget * (1 + 1e-12)

    def pick(eta: float) -> np.ndarray:
        return np.argmin(cost + eta * weight, axis=1)

    def feasible(idx: np.ndarray) -> bool:  # = feasible_bits, from the precomputed w_k D(q) table
        return float(np.sum(weight[rows, idx])) <= budget

    base = float(np.nanmax(np.where(np.isfinite(cost), cost, np.nan))) if np.isfinite(cost).any() else 1.0
    hi = base / max(float(np.min(weight[weight > 0], initial=1e-300)), 1e-300)
    if not feasible(pick(hi)):
        return indices(problem, current.bits)
    if not feasible(pick(0.0)):
        # the least feasible distortion price, by bisection on its logarithm (it spans hundreds of decades)
        log_lo, log_hi = float(np.log(max(hi, 1e-300))) - 1400.0, float(np.log(max(hi, 1e-300)))
        for _ in range(200):
            mid = 0.5 * (log_lo + log_hi)
            if feasible(pick(float(np.exp(mid)))):
                log_hi = mid
            else:
                log_lo = mid
            if log_hi - log_lo <= 1e-12:
                break
        hi = float(np.exp(log_hi))
    else:
        hi = 0.0
    idx = pick(hi).copy()
    return spend_budget(problem, cost, weight, idx)


def spend_budget(problem: AllocationProblem, cost: np.ndarray, weight: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Spend what distortion budget is left greedily: the move (device, bit option) with the best energy
    saving per unit of added distortion first, until no move saves energy within the budget.

    A heap holds each device's best move; the budget left only shrinks, so a move that no longer fits never
    fits again and the device's next best move takes its place (ties: the lowest device, then option)."""
    budget = problem.distortion_budget * (1 + 1e-12)
    used = float(np.sum(weight[np.arange(cost.shape[0]), idx]))
    cost_rows, weight_rows = cost.tolist(), weight.tolist()  # scalar Python: a move looks at Q numbers

    def best_move(k: int) -> tuple[float, int, int] | None:
        costs, weights = cost_rows[k], weight_rows[k]
        here_cost, here_weight = costs[idx[k]], weights[idx[k]]
        best, best_q = -math.inf, -1
        for q, (c, w) in enumerate(zip(costs, weights, strict=True)):
            saving, extra = here_cost - c, w - here_weight
            if saving > 0 and math.isfinite(saving) and used + extra <= budget:
                ratio = saving / max(extra, 1e-300)
                if ratio > best:
                    best, best_q = ratio, q
        return (-best, k, best_q) if math.isfinite(best) else None

    # every device's best move at once (vectorised), then the heap
    rows = np.arange(cost.shape[0])
    with np.errstate(invalid="ignore"):
        saving = cost[rows, idx][:, None] - cost
        extra = weight - weight[rows, idx][:, None]
        ratio = np.where((saving > 0) & np.isfinite(saving) & (used + extra <= budget),
                         saving / np.maximum(extra, 1e-300), -np.inf)
    first = np.argmax(ratio, axis=1)
    heap = [(-float(ratio[k, q]), int(k), int(q)) for k, q in enumerate(first) if np.isfinite(ratio[k, q])]
    heapq.heapify(heap)
    # one entry per device; an entry's ratio bounds the device's best move now (moves only stop fitting),
    # so a popped entry that is still the device's best move is the best move overall
    while heap:
        entry = heapq.heappop(heap)
        k, q = entry[1], entry[2]
        move = best_move(k)
        if move is None:
            continue
        if move != entry:
            heapq.heappush(heap, move)
            continue
        used += float(weight[k, q] - weight[k, idx[k]])
        idx[k] = q
        nxt = best_move(k)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return idx


def allocate(problem: AllocationProblem, search: str = "greedy", max_iters: int = 10,
             reference: tuple[float, float] | None = None) -> Allocation:
    """The joint allocation: block coordinate descent over bits and (power, bandwidth), or enumeration."""
    ref = reference or reference_costs(problem)
    if search == "exhaustive":
        return exhaustive(problem, ref)
    idx = start_bits(problem)
    hints: dict[int, dict[str, object]] = {}
    best = solve_power_bandwidth(problem, idx, ref, hints)
    for _ in range(max_iters):
        candidate_idx = bits_block(problem, best)
        if np.array_equal(candidate_idx, indices(problem, best.bits)):
            break
        candidate = solve_power_bandwidth(problem, candidate_idx, ref, hints)
        if candidate.objective >= best.objective * (1 - 1e-12):
            break
        best = candidate
    return best


def exhaustive_fits(options: int, devices: int) -> bool:
    """Whether enumerating every bit combination stays within EXHAUSTIVE_LIMIT."""
    return options**devices <= EXHAUSTIVE_LIMIT


def exhaustive(problem: AllocationProblem, ref: tuple[float, float]) -> Allocation:
    Q, K = len(problem.bits_options), problem.size
    if not exhaustive_fits(Q, K):
        raise AllocationError(f"exhaustive bit search over {Q}^{K} combinations exceeds {EXHAUSTIVE_LIMIT}; "
                              "use allocation.bits_search=greedy")
    best: Allocation | None = None
    for combo in itertools.product(range(Q), repeat=K):
        idx = np.array(combo)
        if not feasible_bits(problem, idx):
            continue
        try:
            candidate = solve_power_bandwidth(problem, idx, ref)
        except AllocationError:
            continue
        if best is None or candidate.objective < best.objective:
            best = candidate
    if best is None:
        raise AllocationError("no bit combination meets the distortion budget and the caps")
    return best
