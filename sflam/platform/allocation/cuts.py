"""Each device's cut layer, chosen with its bits, power and bandwidth under its memory (docs/concepts/allocator.md).

A device's cut moves work between it and the server: a deeper cut puts more layers on the device (more device
time and energy, more device memory, less server time above the cut, and, docs/benchmarks/privacy.md, less that the
smashed data gives away). `CutOptions` holds, per device and candidate cut, what the round costs there; `problem_at`
turns one choice of cuts into the `AllocationProblem` the existing solvers take. Two policies:

- `memory_cuts` (split policy `memory`): the deepest candidate cut whose measured peak fits the device's budget,
  a pure function of the measurements; a device no cut fits is reported, never given one.
- `allocate_cuts` (split policy `joint`): the λ-objective minimised over each device's (cut, bits) pair, power and
  bandwidth, a cut over the device's budget never chosen. Block coordinate descent whose discrete block prices
  every (cut, bits) pair at the stages' current (b, m), then single-device cut moves; `search="exhaustive"`
  enumerates every (cut, bits) combination within the budgets and solves each one's power/bandwidth block (exact).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np

from sflam.platform.allocation.bits import feasible_bits, spend_budget, start_bits
from sflam.platform.allocation.block import reference_costs, solve_power_bandwidth
from sflam.platform.allocation.links import Links
from sflam.platform.allocation.problem import Allocation, AllocationError, AllocationProblem, distortion
from sflam.platform.config import EXHAUSTIVE_LIMIT


@dataclass(frozen=True, kw_only=True)
class CutOptions:
    """A round's selected devices at each candidate cut; arrays are per device (K), cut (C), stage (J), bits (Q).

    `base` carries what does not depend on the cut (channel gains, bit options, distortion weights and budget,
    band, powers, noise, λ, deadline, caps); its cut-dependent arrays are replaced by `problem_at` (any one cut's
    problem will do). A round's server time is the sum of each device's share at its cut (the server runs the
    layers above each device's cut on that device's samples)."""

    base: AllocationProblem
    cuts: np.ndarray               # (C,) candidate cut layers, ascending: a deeper cut keeps more layers on the device
    uplink_bits: np.ndarray        # (K, C, J, Q) each stage's uplink payload at each cut and bit option
    downlink_bits: np.ndarray      # (K, C, J) each stage's download at each cut
    compute_s: np.ndarray          # (K, C, J) device computation in each stage at its clock
    compute_energy_j: np.ndarray   # (K, C) device compute energy of the round (kappa f^2 cycles)
    raw_uplink_bits: np.ndarray    # (K, C, J) uplink payload at fp32
    server_s: np.ndarray           # (K, C) the server's time above the cut on this device's samples
    memory_mib: np.ndarray         # (K, C) the device part's measured peak memory at each cut
    budget_mib: np.ndarray         # (K,) each device's memory budget (its class's memory_mib)

    def __post_init__(self) -> None:
        K, J, Q, C = self.base.size, self.base.stages, len(self.base.bits_options), len(self.cuts)
        expected = {"uplink_bits": (K, C, J, Q), "downlink_bits": (K, C, J), "compute_s": (K, C, J),
                    "compute_energy_j": (K, C), "raw_uplink_bits": (K, C, J), "server_s": (K, C),
                    "memory_mib": (K, C), "budget_mib": (K,)}
        for name, shape in expected.items():
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"CutOptions.{name} has shape {np.shape(getattr(self, name))}, expected {shape}")
        if C == 0 or np.any(np.diff(self.cuts) <= 0):
            raise ValueError(f"candidate cuts must be distinct and ascending, got {np.asarray(self.cuts).tolist()}")

    @property
    def size(self) -> int:
        return self.base.size

    def fits(self) -> np.ndarray:
        """(K, C): whether each cut's measured peak fits the device's memory budget."""
        return self.memory_mib <= self.budget_mib[:, None]

    def select(self, rows: np.ndarray) -> CutOptions:
        """The options of some devices only (e.g. those a cut fits); their distortion weights renormalised."""
        rows = np.asarray(rows, dtype=np.int64)
        weight = self.base.distortion_weight[rows]
        weight = weight / weight.sum() if weight.sum() > 0 else np.full(len(rows), 1.0 / max(len(rows), 1))
        base = dataclasses.replace(
            self.base, gain=self.base.gain[rows], uplink_bits=self.base.uplink_bits[rows],
            downlink_bits=self.base.downlink_bits[rows], compute_s=self.base.compute_s[rows],
            compute_energy_j=self.base.compute_energy_j[rows], raw_uplink_bits=self.base.raw_uplink_bits[rows],
            distortion_weight=weight)
        return dataclasses.replace(
            self, base=base, uplink_bits=self.uplink_bits[rows], downlink_bits=self.downlink_bits[rows],
            compute_s=self.compute_s[rows], compute_energy_j=self.compute_energy_j[rows],
            raw_uplink_bits=self.raw_uplink_bits[rows], server_s=self.server_s[rows],
            memory_mib=self.memory_mib[rows], budget_mib=self.budget_mib[rows])


@dataclass(frozen=True)
class MemoryCuts:
    """The memory policy's decision: each device's cut, and the devices no candidate cut fits."""

    cut_index: np.ndarray  # (K,) position among the candidates, -1 where none fits
    cuts: np.ndarray       # (K,) the cut layer, -1 where none fits
    excluded: np.ndarray   # device rows no candidate cut fits (left out of the round, never given a cut)


@dataclass(frozen=True)
class CutAllocation:
    """A round's cuts and its allocation at them (`problem` is the round's problem at those cuts)."""

    cut_index: np.ndarray  # (K,)
    cuts: np.ndarray       # (K,) cut layers
    allocation: Allocation
    problem: AllocationProblem


# --------------------------------------------------------------------------- the memory policy


def memory_cuts(cuts: np.ndarray, memory_mib: np.ndarray, budget_mib: np.ndarray) -> MemoryCuts:
    """Split policy `memory`: each device's deepest candidate cut whose measured peak fits its budget.

    The deepest that fits, not the shallowest: it keeps the most layers on the device, so the server runs
    fewer layers and the smashed data is furthest from the input (cuts 0 and 1 give back every token and
    every digit, docs/benchmarks/privacy.md), at the device's cost in time and energy, which the joint policy
    weighs instead. A device no cut fits is reported in `excluded` and gets -1."""
    cuts, memory, budget = np.asarray(cuts), np.asarray(memory_mib, dtype=np.float64), np.asarray(budget_mib)
    fit = memory <= budget[:, None]
    C = fit.shape[1]
    deepest = C - 1 - np.argmax(fit[:, ::-1], axis=1)
    index = np.where(fit.any(axis=1), deepest, -1)
    return MemoryCuts(cut_index=index, cuts=np.where(index >= 0, cuts[np.maximum(index, 0)], -1),
                      excluded=np.flatnonzero(index < 0))


# --------------------------------------------------------------------------- a choice of cuts as a problem


def problem_at(options: CutOptions, cut_index: np.ndarray) -> AllocationProblem:
    """The round's allocation problem with device k at candidate cut cut_index[k]."""
    rows, idx = np.arange(options.size), np.asarray(cut_index, dtype=np.int64)
    return dataclasses.replace(
        options.base, uplink_bits=options.uplink_bits[rows, idx], downlink_bits=options.downlink_bits[rows, idx],
        compute_s=options.compute_s[rows, idx], compute_energy_j=options.compute_energy_j[rows, idx],
        raw_uplink_bits=options.raw_uplink_bits[rows, idx], server_s=float(options.server_s[rows, idx].sum()))


def cut_reference(options: CutOptions) -> tuple[float, float]:
    """(T0, E0) for every choice of cuts: the equal fp32 allocation at the memory policy's cuts (one scale for all
    choices, so their objectives compare)."""
    return reference_costs(problem_at(options, _require_fit(options).cut_index))


def _require_fit(options: CutOptions) -> MemoryCuts:
    chosen = memory_cuts(options.cuts, options.memory_mib, options.budget_mib)
    if chosen.excluded.size:
        raise AllocationError(f"no candidate cut fits the memory budget of devices {chosen.excluded.tolist()}; "
                              "leave them out of the round (memory_cuts reports them)")
    return chosen


# --------------------------------------------------------------------------- the (cut, bits) block


def pair_costs(options: CutOptions, current: Allocation, ref: tuple[float, float]) -> np.ndarray:
    """(K, C*Q) each device's share of the objective at each (cut, bits) pair, the stages' shares and lengths held:
    its compute and uplink energy (the uplink using all the slack its stage leaves it) and its server time;
    inf where the pair needs more than full power, misses the energy cap or does not fit the memory budget."""
    base, K, C = options.base, options.size, len(options.cuts)
    Q, J = len(base.bits_options), base.stages
    T0, E0 = ref
    cost = np.zeros((K, C, Q))
    for c in range(C):
        energy = np.tile(options.compute_energy_j[:, c][:, None], (1, Q))
        for q in range(Q):
            for j in range(J):
                lk = Links(base, options.uplink_bits[:, c, j, q], options.downlink_bits[:, c, j],
                           options.compute_s[:, c, j], np.full(K, np.inf), (0.0, 0.0))
                b, m = current.stage_bandwidth_hz[:, j], current.stage_s[j]
                tau = m - lk.c - lk.downlink_s(b)
                ok = tau >= lk.full_power_s(b) * (1 - 1e-12) - 1e-12 * m
                energy[:, q] += np.where(ok, lk.energy(np.maximum(tau, 1e-300), b), np.inf)
        if base.energy_cap_j is not None:
            energy = np.where(energy <= base.energy_cap_j * (1 + 1e-9), energy, np.inf)
        time = base.lam * options.server_s[:, c] / T0
        finite = np.isfinite(energy)  # (1 - lam) * inf is nan at lam = 1: an infeasible pair stays inf
        cost[:, c, :] = np.where(finite, (1 - base.lam) * np.where(finite, energy, 0.0) / E0 + time[:, None], np.inf)
    cost = np.where(options.fits()[:, :, None], cost, np.inf)
    return cost.reshape(K, C * Q)


def pair_block(options: CutOptions, current_cut: np.ndarray, current: Allocation, ref: tuple[float, float]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(cut_index, bits_index) given the stages' (b, m): a Lagrangian price on distortion picks each device's pair,
    then the greedy spends what budget is left (as the bits block does, over pairs instead of bit widths)."""
    base, K, Q = options.base, options.size, len(options.base.bits_options)
    cost = pair_costs(options, current, ref)
    weight = np.tile(base.distortion_weight[:, None] * distortion(base.bits_options)[None, :], (1, len(options.cuts)))
    rows, budget = np.arange(K), base.distortion_budget * (1 + 1e-12)

    def pick(eta: float) -> np.ndarray:
        return np.argmin(cost + eta * weight, axis=1)

    def feasible(idx: np.ndarray) -> bool:
        return float(np.sum(weight[rows, idx])) <= budget and bool(np.all(np.isfinite(cost[rows, idx])))

    finite = cost[np.isfinite(cost)]
    scale = float(finite.max()) if finite.size else 1.0
    hi = min(max(scale, 1e-300) / max(float(np.min(weight[weight > 0], initial=1e-300)), 1e-300), 1e300)
    if not feasible(pick(hi)):
        return np.asarray(current_cut), _bit_indices(base, current.bits)
    eta = 0.0
    if not feasible(pick(0.0)):  # the least feasible distortion price, by bisection on its logarithm
        log_lo, log_hi = math.log(hi) - 1400.0, math.log(hi)
        while log_hi - log_lo > 1e-12:
            mid = 0.5 * (log_lo + log_hi)
            log_lo, log_hi = (log_lo, mid) if feasible(pick(math.exp(mid))) else (mid, log_hi)
        eta = math.exp(log_hi)
    idx = spend_budget(base, cost, weight, pick(eta).copy())
    return idx // Q, idx % Q


def _bit_indices(problem: AllocationProblem, bits: np.ndarray) -> np.ndarray:
    return np.array([problem.option_index(int(q)) for q in bits], dtype=np.int64)


# --------------------------------------------------------------------------- the joint allocation


def exhaustive_cuts_fit(options: CutOptions) -> bool:
    """Whether enumerating every (cut, bits) combination within the memory budgets stays within EXHAUSTIVE_LIMIT."""
    per_device = options.fits().sum(axis=1) * len(options.base.bits_options)
    return math.prod(int(n) for n in per_device) <= EXHAUSTIVE_LIMIT


def allocate_cuts(options: CutOptions, search: str = "greedy", max_iters: int = 10,
                  reference: tuple[float, float] | None = None) -> CutAllocation:
    """Split policy `joint`: each device's cut and bits, power and bandwidth minimising the λ-objective, every cut
    within its device's memory budget. `greedy`: block coordinate descent from the memory policy's cuts and from
    the shallowest that fit, then single-device cut moves; `exhaustive`: every combination (exact)."""
    chosen = _require_fit(options)
    ref = reference or reference_costs(problem_at(options, chosen.cut_index))
    if search == "exhaustive":
        return _exhaustive(options, ref)
    if search != "greedy":
        raise ValueError(f"search must be greedy or exhaustive, got {search!r}")
    fit = options.fits()
    shallowest = np.argmax(fit, axis=1)
    best: CutAllocation | None = None
    failure: AllocationError | None = None
    for start in _unique([chosen.cut_index, shallowest]):
        try:
            found = _descend(options, start, ref, max_iters)
        except AllocationError as error:
            failure = error
            continue
        if best is None or found.allocation.objective < best.allocation.objective:
            best = found
    if best is None:
        raise AllocationError(f"neither the memory policy's cuts nor the shallowest that fit admit an allocation: "
                              f"{failure}") from failure
    return _move_cuts(options, best, ref, max_iters)


def _unique(starts: list[np.ndarray]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for s in starts:
        if not any(np.array_equal(s, t) for t in out):
            out.append(np.asarray(s, dtype=np.int64))
    return out


def _solve(options: CutOptions, cut_index: np.ndarray, bits_index: np.ndarray, ref: tuple[float, float]
           ) -> CutAllocation:
    problem = problem_at(options, cut_index)
    allocation = solve_power_bandwidth(problem, bits_index, ref)
    return CutAllocation(cut_index=np.asarray(cut_index, dtype=np.int64).copy(),
                         cuts=options.cuts[np.asarray(cut_index)], allocation=allocation, problem=problem)


def _descend(options: CutOptions, cut_index: np.ndarray, ref: tuple[float, float], max_iters: int,
             bits_index: np.ndarray | None = None) -> CutAllocation:
    """Block coordinate descent from these cuts: the (cut, bits) block, then the power/bandwidth block, while the
    objective falls."""
    problem = problem_at(options, cut_index)
    best = _solve(options, cut_index, start_bits(problem) if bits_index is None else bits_index, ref)
    for _ in range(max_iters):
        cut, bits = pair_block(options, best.cut_index, best.allocation, ref)
        if np.array_equal(cut, best.cut_index) and np.array_equal(bits, _bit_indices(problem, best.allocation.bits)):
            break
        try:
            candidate = _solve(options, cut, bits, ref)
        except AllocationError:
            break
        if candidate.allocation.objective >= best.allocation.objective * (1 - 1e-12):
            break
        best = candidate
    return best


def _move_cuts(options: CutOptions, best: CutAllocation, ref: tuple[float, float], max_iters: int) -> CutAllocation:
    """Single-device cut moves, each re-solved by the descent, while one lowers the objective: the (cut, bits)
    block prices a cut at the stages' current lengths, so it cannot see a cut that would shorten them."""
    fit = options.fits()
    for _ in range(max_iters):
        improved = False
        for k in range(options.size):
            for c in np.flatnonzero(fit[k]):
                if c == best.cut_index[k]:
                    continue
                trial = best.cut_index.copy()
                trial[k] = c
                bits = _bit_indices(options.base, best.allocation.bits)
                try:
                    found = _descend(options, trial, ref, max_iters, bits)
                except AllocationError:
                    continue
                if found.allocation.objective < best.allocation.objective * (1 - 1e-9):
                    best, improved = found, True
        if not improved:
            break
    return best


def _exhaustive(options: CutOptions, ref: tuple[float, float]) -> CutAllocation:
    if not exhaustive_cuts_fit(options):
        raise AllocationError(f"exhaustive search over the (cut, bits) combinations exceeds {EXHAUSTIVE_LIMIT}; "
                              "use search=greedy")
    base, Q = options.base, len(options.base.bits_options)
    fit = options.fits()
    feasible_bit_combos = [np.array(combo) for combo in itertools.product(range(Q), repeat=options.size)
                           if feasible_bits(base, np.array(combo))]
    best: CutAllocation | None = None
    for cuts in itertools.product(*(np.flatnonzero(fit[k]) for k in range(options.size))):
        cut_index = np.array(cuts, dtype=np.int64)
        problem = problem_at(options, cut_index)
        hints: dict[int, dict[str, object]] = {}
        for bits_index in feasible_bit_combos:
            try:
                allocation = solve_power_bandwidth(problem, bits_index, ref, hints)
            except AllocationError:
                continue
            if best is None or allocation.objective < best.allocation.objective:
                best = CutAllocation(cut_index=cut_index, cuts=options.cuts[cut_index], allocation=allocation,
                                     problem=problem)
    if best is None:
        raise AllocationError("no (cut, bits) combination within the memory budgets meets the distortion budget, "
                              "the deadline and the caps")
    return best
