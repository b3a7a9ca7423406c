"""Joint allocation of activation bits, transmit power and bandwidth per device in a round (DESIGN §7).

    minimise  lam * T / T0 + (1 - lam) * E / E0
    over      q_k in Q, p_k in [0, P_max], b_k >= 0,   sum_k b_k <= B,
              sum_k w_k D(q_k) <= eps,  optional per-device energy caps,  T <= T_max,

with T the round latency (max over devices) and E the devices' energy; T0, E0 are the values of the
equal allocation at fp32 (b = B/K, P_max, q = 32), so lam is unit-free.

For fixed bits the power/bandwidth block is convex in (uplink time tau_k, b_k, T): the uplink energy
tau (N0 b / g)(2^(S / (tau b)) - 1) is the perspective of an exponential, jointly convex; the power cap
is tau >= S / (b log2(1 + P_max g / (N0 b))), the downlink time at server power is convex decreasing
in b. Energy falls with time, so every device uses its whole slack: tau_k = T - c_k - D_k(b_k). For a
given T the problem is a separable convex resource allocation over b, solved exactly through its
bandwidth price nu (each device: e_k'(b_k) = -nu; sum b_k = B); the optimal value is convex in T,
minimised by Brent's method on [T_min, T_max]. Every one-dimensional root is bracketed and found with
vectorised Illinois false position. The bits block alternates with it (block coordinate descent):
given (b, T), each device's uplink energy at each bit width is known; a Lagrangian price on distortion
picks the bits, a greedy pass spends what budget is left, and the block is kept when the objective falls.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from sflam.platform.errors import SflamError
from sflam.platform.system import LN2

EXHAUSTIVE_LIMIT = 4096
MAX_X = 1000.0  # spectral efficiency cap (bit/s/Hz) that keeps 2^x finite


class AllocationError(SflamError):
    """No allocation satisfies the constraints (deadline, energy caps, bandwidth)."""


def distortion(bits: np.ndarray | int) -> np.ndarray:
    """Per-element variance bound of the codec relative to the row range squared: Δ²/4 / range² (0 at 32 bits)."""
    q = np.asarray(bits, dtype=np.float64)
    return np.where(q >= 32, 0.0, 1.0 / (4.0 * (2.0 ** np.minimum(q, 31) - 1.0) ** 2))


@dataclass(frozen=True)
class AllocationProblem:
    """One round's selected devices and what they must send; all arrays are per device (length K)."""

    gain: np.ndarray                 # channel power gain g_k
    uplink_bits: np.ndarray          # (K, Q): round uplink payload at each bit option (smashed data + adapter)
    downlink_bits: np.ndarray        # gradients + adapter down at the server power
    fixed_latency_s: np.ndarray      # compute and server time (do not depend on the allocation)
    compute_energy_j: np.ndarray     # device compute energy of the round
    bits_options: np.ndarray         # (Q,) allowed activation bit widths
    raw_uplink_bits: np.ndarray      # uplink payload at fp32 (for the reference T0, E0)
    distortion_weight: np.ndarray    # w_k, sums to 1 (share of the round's activation elements)
    distortion_budget: float         # eps
    bandwidth_hz: float
    max_power_w: float
    server_power_w: float
    n0: float
    lam: float = 0.5
    deadline_s: float | None = None
    max_latency_factor: float = 10.0
    energy_cap_j: float | None = None

    @property
    def size(self) -> int:
        return int(self.gain.shape[0])

    def option_index(self, bits: int) -> int:
        matches = np.flatnonzero(self.bits_options == bits)
        if matches.size == 0:
            raise ValueError(f"{bits} bits is not among the options {self.bits_options.tolist()}")
        return int(matches[0])


@dataclass(frozen=True)
class Allocation:
    """A round's plan and what it costs, per device and in total."""

    bits: np.ndarray
    power_w: np.ndarray
    bandwidth_hz: np.ndarray
    uplink_s: np.ndarray
    downlink_s: np.ndarray
    latency_s: np.ndarray
    uplink_energy_j: np.ndarray
    energy_j: np.ndarray             # compute + uplink, per device
    round_latency_s: float
    total_energy_j: float
    objective: float
    reference: tuple[float, float] = field(default=(1.0, 1.0))  # (T0, E0)

    @property
    def comm_latency_s(self) -> np.ndarray:
        return self.uplink_s + self.downlink_s


# --------------------------------------------------------------------------- vectorised 1-D roots


def _root_increasing(f: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray, iters: int = 80,
                     rtol: float = 1e-12) -> np.ndarray:
    """Root of an increasing f in [lo, hi] per element (Illinois false position, bisection safeguard).

    Where f(lo) >= 0 the answer is lo; where f(hi) <= 0 it is hi.
    """
    lo, hi = np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64)
    flo, fhi = f(lo), f(hi)
    done_lo, done_hi = flo >= 0, fhi <= 0
    x = np.where(done_lo, lo, hi).astype(np.float64)
    active = ~(done_lo | done_hi)
    if not active.any():
        return x
    everyone = bool(active.all())
    a, b, fa, fb = lo[active], hi[active], flo[active], fhi[active]
    side = np.zeros_like(a)
    prev = np.full_like(a, np.nan)
    m = 0.5 * (a + b)
    for it in range(iters):
        if it % 8 == 7:  # a bisection now and then bounds the worst case
            m = 0.5 * (a + b)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                guess = (a * fb - b * fa) / (fb - fa)
            m = np.where((guess > a) & (guess < b), guess, 0.5 * (a + b))  # NaN and inf fail both tests
        fm = f(m) if everyone else f_sub(f, active, x, m)
        pos = fm > 0
        # Illinois: an end point kept twice in a row has its function value halved
        fa = np.where(pos, fa * np.where(side > 0, 0.5, 1.0), fm)
        fb = np.where(pos, fm, fb * np.where(side < 0, 0.5, 1.0))
        a, b = np.where(pos, a, m), np.where(pos, m, b)
        side = np.where(pos, 1.0, -1.0)
        if bool(np.all(np.abs(m - prev) <= rtol * np.abs(m))):
            break
        prev = m
    x[active] = m
    return x


def f_sub(f: Callable[[np.ndarray], np.ndarray], active: np.ndarray, template: np.ndarray,
          values: np.ndarray) -> np.ndarray:
    """Evaluate an element-wise f on the active elements only (f is written for the full vector)."""
    full = template.copy()
    full[active] = values
    return f(full)[active]


# --------------------------------------------------------------------------- the power/bandwidth block


class _Links:
    """Per-device link quantities for fixed uplink payloads S (vectorised over devices)."""

    def __init__(self, problem: AllocationProblem, uplink_bits: np.ndarray) -> None:
        self.p = problem
        self.g = problem.gain.astype(np.float64)
        self.S = uplink_bits.astype(np.float64)
        self.Sd = problem.downlink_bits.astype(np.float64)
        self.c = problem.fixed_latency_s.astype(np.float64)
        self.a_up = problem.max_power_w * self.g / problem.n0
        self.a_dn = problem.server_power_w * self.g / problem.n0
        self.coef = problem.n0 / self.g  # energy = coef * u * (2^(S/u) - 1), u = tau * b
        cap = np.inf if problem.energy_cap_j is None else problem.energy_cap_j
        self.uplink_cap = cap - problem.compute_energy_j  # uplink energy allowed by the cap
        self.b_floor = problem.bandwidth_hz * 1e-12
        self.nu_hint: float | None = None

    # rates and times ---------------------------------------------------------
    @staticmethod
    def _capacity(b: np.ndarray, a: np.ndarray) -> np.ndarray:
        return b * np.log2(1.0 + a / b)

    def downlink_s(self, b: np.ndarray) -> np.ndarray:
        return np.where(self.Sd > 0, self.Sd / self._capacity(b, self.a_dn), 0.0)

    def downlink_slope(self, b: np.ndarray) -> np.ndarray:
        """dD/db (negative)."""
        r = self._capacity(b, self.a_dn)
        dr = np.log2(1.0 + self.a_dn / b) - self.a_dn / (LN2 * (b + self.a_dn))
        return np.where(self.Sd > 0, -self.Sd * dr / r**2, 0.0)

    def full_power_s(self, b: np.ndarray) -> np.ndarray:
        return self.S / self._capacity(b, self.a_up)

    def uplink_time(self, b: np.ndarray, T: float | np.ndarray) -> np.ndarray:
        return T - self.c - self.downlink_s(b)

    # energy ------------------------------------------------------------------
    def energy(self, tau: np.ndarray, b: np.ndarray) -> np.ndarray:
        u = tau * b
        x = np.minimum(self.S / np.where(u > 0, u, 1e-300), MAX_X)
        return np.where(u > 0, self.coef * u * np.expm1(x * LN2), np.inf)

    def energy_at(self, b: np.ndarray, T: float | np.ndarray) -> np.ndarray:
        return self.energy(self.uplink_time(b, T), b)

    def energy_slope(self, b: np.ndarray, T: float | np.ndarray) -> np.ndarray:
        """d/db of the uplink energy when tau = T - c - D(b) (negative: more bandwidth, less energy)."""
        tau = self.uplink_time(b, T)
        u = tau * b
        x = np.minimum(self.S / np.where(u > 0, u, 1e-300), MAX_X)
        two_x = np.exp2(x)
        phi = two_x - 1.0 - x * LN2 * two_x  # d/du of u (2^(S/u) - 1), <= 0
        du = tau - b * self.downlink_slope(b)
        return np.where(u > 0, self.coef * phi * du, -np.inf)

    def power(self, tau: np.ndarray, b: np.ndarray) -> np.ndarray:
        x = np.minimum(self.S / (tau * b), MAX_X)
        return self.coef * b * np.expm1(x * LN2)

    # feasibility -------------------------------------------------------------
    def min_bandwidth(self, T: float) -> np.ndarray:
        """Least b per device that finishes by T within the power cap (and energy cap); inf if none <= B."""
        B = self.p.bandwidth_hz
        lo = np.full_like(self.g, np.log(self.b_floor))
        hi = np.full_like(self.g, np.log(B))

        def slack(log_b: np.ndarray) -> np.ndarray:  # log(available time / time at full power), increasing
            b = np.exp(log_b)
            available = self.uplink_time(b, T)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(available > 0, np.log(np.maximum(available, 1e-300)) - np.log(self.full_power_s(b)),
                                -np.inf)

        need = np.exp(_root_increasing(slack, lo, hi, rtol=1e-9))
        feasible = slack(np.log(np.full_like(self.g, B))) >= -1e-12
        if np.isfinite(self.uplink_cap).any():
            def cap_slack(log_b: np.ndarray) -> np.ndarray:
                b = np.exp(log_b)
                e = self.energy_at(b, T)
                with np.errstate(divide="ignore", invalid="ignore"):
                    return np.where(np.isfinite(e) & (self.uplink_cap > 0),
                                    np.log(np.maximum(self.uplink_cap, 1e-300)) - np.log(np.maximum(e, 1e-300)),
                                    -np.inf)

            need = np.maximum(need, np.exp(_root_increasing(cap_slack, lo, hi, rtol=1e-9)))
            feasible &= cap_slack(np.log(np.full_like(self.g, B))) >= -1e-12
        return np.where(feasible, need, np.inf)

    def latency_lower_bound(self) -> float:
        """No T below this is feasible: infinite bandwidth at full power up and down."""
        up = self.S * self.p.n0 * LN2 / (self.p.max_power_w * self.g)
        down = self.Sd * self.p.n0 * LN2 / (self.p.server_power_w * self.g)
        return float(np.max(self.c + up + down))

    def bandwidth_at_price(self, nu: float, T: float, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """argmin over b in [lower, upper] of e(b) + nu b, per device (the bracket holds the minimiser)."""

        log_nu = np.log(nu)

        def marginal(log_b: np.ndarray) -> np.ndarray:  # log nu - log(-e'(b)), increasing in b
            with np.errstate(divide="ignore"):
                return log_nu - np.log(-self.energy_slope(np.exp(log_b), T))

        return np.exp(_root_increasing(marginal, np.log(lower), np.log(upper), rtol=1e-8))


@dataclass
class _BlockSolution:
    T: float
    bandwidth: np.ndarray
    uplink_energy: np.ndarray
    objective: float
    slope: float = float("nan")  # sign of dJ/dT as log(lam/T0) - log(-(1-lam)/E0 dE/dT); nan where unknown


def _objective(problem: AllocationProblem, T: float, uplink_energy: np.ndarray, ref: tuple[float, float]) -> float:
    T0, E0 = ref
    energy = float(np.sum(problem.compute_energy_j) + np.sum(uplink_energy))
    return problem.lam * T / T0 + (1.0 - problem.lam) * energy / E0


def _split_bandwidth(links: _Links, T: float, b_min: np.ndarray) -> tuple[np.ndarray, float]:
    """Optimal bandwidth shares at round latency T and their price nu (the shares sum to B)."""
    B = links.p.bandwidth_hz
    if links.p.size == 1:
        return np.array([B]), float(-links.energy_slope(np.array([B]), T)[0])
    slope_min = -links.energy_slope(b_min, T)
    nu_hi = float(np.max(slope_min[np.isfinite(slope_min)], initial=0.0))
    if nu_hi <= 0 or float(np.sum(b_min)) >= B * (1 - 1e-12):
        return b_min * min(1.0, B / float(np.sum(b_min))), nu_hi
    slope_max = -links.energy_slope(np.full_like(b_min, B), T)
    nu_lo = max(float(np.min(slope_max)) * 1e-3, nu_hi * 1e-300)
    # b(nu) falls as nu rises: every evaluated price narrows the bracket of each device's share
    lower, upper = b_min.copy(), np.full_like(b_min, B)

    def excess(log_nu: float) -> float:  # increasing in nu: log B - log sum b(nu)
        b = links.bandwidth_at_price(float(np.exp(log_nu)), T, lower, upper)
        total = float(np.sum(b))
        if total > B:
            upper[:] = np.minimum(upper, b)
        else:
            lower[:] = np.maximum(lower, b)
        return float(np.log(B) - np.log(total))

    lo, hi = float(np.log(nu_lo)), float(np.log(nu_hi))
    log_nu: float | None = None
    if links.nu_hint is not None and lo < np.log(links.nu_hint) < hi:
        # warm start: the price moves little between the round latencies the outer search tries
        centre = float(np.log(links.nu_hint))
        try:
            log_nu = brentq(excess, max(lo, centre - 0.25), min(hi, centre + 0.25), xtol=1e-6, rtol=1e-8)
        except ValueError:  # not bracketed there: search the whole range
            log_nu = None
    if log_nu is None:
        f_lo, f_hi = excess(lo), excess(hi)
        if f_lo >= 0 or f_hi <= 0:
            log_nu = lo if f_lo >= 0 else hi
        else:
            log_nu = brentq(excess, lo, hi, xtol=1e-6, rtol=1e-8)  # errors here cost the objective only squared
    nu = float(np.exp(log_nu))
    links.nu_hint = nu
    b = links.bandwidth_at_price(nu, T, lower, upper)
    return b * min(1.0, B / float(np.sum(b))), nu


def _latency_slope(links: _Links, T: float, b: np.ndarray, b_min: np.ndarray, nu: float,
                   ref: tuple[float, float]) -> float:
    """dJ/dT at the optimum for T (envelope theorem): the devices' marginal energy of time, plus the
    multipliers of the power caps that bind (a device held at its minimum bandwidth)."""
    tau = links.uplink_time(b, T)
    x = np.minimum(links.S / (tau * b), MAX_X)
    two_x = np.exp2(x)
    de_dT = links.coef * b * (two_x - 1.0 - x * LN2 * two_x)
    bound = b <= b_min * (1 + 1e-9)
    if bound.any():
        cap = links._capacity(b, links.a_up)
        d_cap = np.log2(1.0 + links.a_up / b) - links.a_up / (LN2 * (b + links.a_up))
        g_slope = -links.S * d_cap / cap**2 + links.downlink_slope(b)
        rho = np.clip(-(links.energy_slope(b, T) + nu) / g_slope, 0.0, None)
        de_dT = de_dT - np.where(bound, rho, 0.0)
    T0, E0 = ref
    marginal_energy = -(1.0 - links.p.lam) / E0 * float(np.sum(de_dT))  # value of one more second, >= 0
    # log of (latency weight / energy value): increasing in T, zero at the optimum
    with np.errstate(divide="ignore"):
        return float(np.log(links.p.lam / T0) - np.log(marginal_energy)) if links.p.lam > 0 else -np.inf


def _solve_at(links: _Links, T: float, ref: tuple[float, float]) -> _BlockSolution:
    b_min = links.min_bandwidth(T)
    if not np.all(np.isfinite(b_min)) or float(np.sum(b_min)) > links.p.bandwidth_hz * (1 + 1e-9):
        return _BlockSolution(T, b_min, np.full_like(b_min, np.inf), np.inf)
    b, nu = _split_bandwidth(links, T, b_min)
    energy = links.energy_at(b, T)
    slope = _latency_slope(links, T, b, b_min, nu, ref) if links.p.energy_cap_j is None else float("nan")
    return _BlockSolution(T, b, energy, _objective(links.p, T, energy, ref), slope)


def _min_latency(links: _Links, horizon: float) -> float:
    """The least feasible round latency: the smallest T whose minimum bandwidths fit in B."""
    B = links.p.bandwidth_hz
    lower = links.latency_lower_bound()

    def fits(log_T: float) -> float:
        need = np.minimum(links.min_bandwidth(float(np.exp(log_T))), 2 * B)
        return float(np.log(B) - np.log(float(np.sum(need))))

    if fits(np.log(horizon)) < 0:
        raise AllocationError(f"no allocation finishes the round within {horizon:.4g} s under the bandwidth, "
                              "power and energy caps; raise allocation.deadline_s or allocation.energy_cap_j")
    if fits(np.log(lower)) >= 0:
        return lower
    T = float(np.exp(brentq(fits, np.log(lower), np.log(horizon), xtol=1e-12, rtol=1e-10)))
    for step in range(60):  # step onto the feasible side of the root
        if fits(np.log(T)) >= 0:
            break
        T *= 1 + 1e-12 * 2.0**step
    return T


def _minimise_latency_objective(links: _Links, T_min: float, horizon: float, at_min: _BlockSolution,
                                ref: tuple[float, float]) -> _BlockSolution:
    """J(T) is convex: its minimiser is T_min, the horizon, or the root of dJ/dT between them."""
    if at_min.slope >= 0:
        return at_min
    seen: dict[float, _BlockSolution] = {}  # by log(T - T_min): the search's end points are solved once

    def solve(log_gap: float) -> _BlockSolution:
        if log_gap not in seen:
            seen[log_gap] = _solve_at(links, T_min + float(np.exp(log_gap)), ref)
        return seen[log_gap]

    def slope(log_gap: float) -> float:  # in log(T - T_min): the energy's marginal value is steep near T_min
        value = solve(log_gap).slope
        return value if np.isfinite(value) else -1e300  # infeasible: below the least latency, go up

    low, high = float(np.log(T_min * 1e-12)), float(np.log(horizon - T_min))
    at_end = solve(high)
    if at_end.slope <= 0:
        return at_end
    if slope(low) >= 0:
        return at_min
    best = solve(brentq(slope, low, high, xtol=1e-6, rtol=1e-8))
    return min([best, at_min, at_end], key=lambda sol: sol.objective)


def solve_power_bandwidth(problem: AllocationProblem, bits_index: np.ndarray,
                          reference: tuple[float, float] | None = None) -> Allocation:
    """The optimal power and bandwidth for fixed bits (the convex block), as a full allocation."""
    ref = reference or reference_costs(problem)
    uplink = problem.uplink_bits[np.arange(problem.size), bits_index]
    links = _Links(problem, uplink)
    horizon = problem.deadline_s if problem.deadline_s is not None else problem.max_latency_factor * ref[0]
    T_min = _min_latency(links, horizon)
    best = _solve_at(links, T_min, ref)
    if problem.lam < 1.0 and horizon > T_min * (1 + 1e-9) and np.isfinite(best.slope):
        best = _minimise_latency_objective(links, T_min, horizon, best, ref)
    elif problem.lam < 1.0 and horizon > T_min * (1 + 1e-9):
        found = minimize_scalar(lambda T: _solve_at(links, float(T), ref).objective, bounds=(T_min, horizon),
                                method="bounded", options={"xatol": T_min * 1e-7, "maxiter": 200})
        candidate = _solve_at(links, float(found.x), ref)
        if candidate.objective < best.objective:
            best = candidate
        end = _solve_at(links, horizon, ref)
        if end.objective < best.objective:
            best = end
    return _assemble(problem, links, problem.bits_options[bits_index], best, ref)


def _assemble(problem: AllocationProblem, links: _Links, bits: np.ndarray, sol: _BlockSolution,
              ref: tuple[float, float]) -> Allocation:
    b = sol.bandwidth
    down = links.downlink_s(b)
    tau = sol.T - links.c - down
    power = np.minimum(links.power(tau, b), problem.max_power_w)
    tau = np.maximum(tau, links.full_power_s(b))  # rounding at the cap: never faster than full power
    up_energy = power * tau
    latency = links.c + tau + down
    energy = problem.compute_energy_j + up_energy
    T = float(np.max(latency))
    total = float(np.sum(energy))
    objective = problem.lam * T / ref[0] + (1 - problem.lam) * total / ref[1]
    return Allocation(bits.astype(np.int64), power, b, tau, down, latency, up_energy, energy, T, total, objective,
                      ref)


# --------------------------------------------------------------------------- baselines and reference


def equal_allocation(problem: AllocationProblem, bits: int | np.ndarray,
                     reference: tuple[float, float] | None = None, uplink_bits: np.ndarray | None = None
                     ) -> Allocation:
    """Equal bandwidth B/K, full power, fixed bits: the baselines' allocation."""
    K = problem.size
    bits_arr = np.broadcast_to(np.asarray(bits, dtype=np.int64), (K,))
    if uplink_bits is None:
        idx = np.array([problem.option_index(int(q)) for q in bits_arr])
        uplink_bits = problem.uplink_bits[np.arange(K), idx]
    links = _Links(problem, uplink_bits)
    b = np.full(K, problem.bandwidth_hz / K)
    up = links.full_power_s(b)
    down = links.downlink_s(b)
    power = np.full(K, problem.max_power_w)
    latency = links.c + up + down
    up_energy = power * up
    energy = problem.compute_energy_j + up_energy
    T, total = float(np.max(latency)), float(np.sum(energy))
    ref = reference or (T, total)
    objective = problem.lam * T / ref[0] + (1 - problem.lam) * total / ref[1]
    return Allocation(bits_arr.copy(), power, b, up, down, latency, up_energy, energy, T, total, objective, ref)


def reference_costs(problem: AllocationProblem) -> tuple[float, float]:
    """(T0, E0): round latency and energy of the equal fp32 allocation."""
    raw = equal_allocation(problem, 32, reference=(1.0, 1.0), uplink_bits=problem.raw_uplink_bits)
    return raw.round_latency_s, raw.total_energy_j


# --------------------------------------------------------------------------- the bits block


def _indices(problem: AllocationProblem, bits: np.ndarray) -> np.ndarray:
    """Bit widths -> their positions in the options."""
    order = np.argsort(problem.bits_options)
    return order[np.searchsorted(problem.bits_options[order], bits)]


def _feasible_bits(problem: AllocationProblem, idx: np.ndarray) -> bool:
    d = float(np.sum(problem.distortion_weight * distortion(problem.bits_options[idx])))
    return d <= problem.distortion_budget * (1 + 1e-12)


def _start_bits(problem: AllocationProblem) -> np.ndarray:
    """The cheapest uniform bit width that meets the distortion budget."""
    order = np.argsort(problem.bits_options)
    for j in order:
        idx = np.full(problem.size, j)
        if _feasible_bits(problem, idx):
            return idx
    raise AllocationError("no bit width meets the distortion budget: add 32 to allocation.bits")


def _bits_block(problem: AllocationProblem, current: Allocation) -> np.ndarray:
    """Bits given (b, T): each device's uplink energy per bit option, a distortion price, then greedy fill."""
    K, Q = problem.size, len(problem.bits_options)
    T = current.round_latency_s
    cost = np.full((K, Q), np.inf)
    for j in range(Q):
        links = _Links(problem, problem.uplink_bits[:, j])
        tau = T - links.c - links.downlink_s(current.bandwidth_hz)
        ok = tau >= links.full_power_s(current.bandwidth_hz) * (1 - 1e-12)
        e = links.energy(np.maximum(tau, 1e-300), current.bandwidth_hz)
        ok &= e <= links.uplink_cap
        cost[:, j] = np.where(ok, e, np.inf)
    weight = problem.distortion_weight[:, None] * distortion(problem.bits_options)[None, :]

    def pick(eta: float) -> np.ndarray:
        return np.argmin(cost + eta * weight, axis=1)

    base = float(np.nanmax(np.where(np.isfinite(cost), cost, np.nan))) if np.isfinite(cost).any() else 1.0
    lo, hi = 0.0, base / max(float(np.min(weight[weight > 0], initial=1e-300)), 1e-300)
    if not _feasible_bits(problem, pick(hi)):
        return _indices(problem, current.bits)
    for _ in range(200):
        mid = 0.5 * (lo + hi) if hi < 1e300 else np.sqrt(max(lo, 1e-300) * hi)
        if _feasible_bits(problem, pick(mid)):
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    idx = pick(hi).copy()
    # spend what budget is left: the best energy saving per unit of added distortion first
    rows = np.arange(K)
    budget = problem.distortion_budget * (1 + 1e-12)
    while True:
        used = float(np.sum(weight[rows, idx]))
        with np.errstate(invalid="ignore"):
            saving = cost[rows, idx][:, None] - cost
            extra = weight - weight[rows, idx][:, None]
            ratio = np.where((saving > 0) & np.isfinite(saving) & (used + extra <= budget),
                             saving / np.maximum(extra, 1e-300), -np.inf)
        flat = int(np.argmax(ratio))
        if not np.isfinite(ratio.flat[flat]):
            return idx
        idx[flat // Q] = flat % Q


def allocate(problem: AllocationProblem, search: str = "greedy", max_iters: int = 10) -> Allocation:
    """The joint allocation: block coordinate descent over bits and (power, bandwidth), or enumeration."""
    ref = reference_costs(problem)
    if search == "exhaustive":
        return _exhaustive(problem, ref)
    idx = _start_bits(problem)
    best = solve_power_bandwidth(problem, idx, ref)
    for _ in range(max_iters):
        candidate_idx = _bits_block(problem, best)
        if np.array_equal(candidate_idx, _indices(problem, best.bits)):
            break
        candidate = solve_power_bandwidth(problem, candidate_idx, ref)
        if candidate.objective >= best.objective * (1 - 1e-12):
            break
        best = candidate
    return best


def _exhaustive(problem: AllocationProblem, ref: tuple[float, float]) -> Allocation:
    Q, K = len(problem.bits_options), problem.size
    if Q**K > EXHAUSTIVE_LIMIT:
        raise AllocationError(f"exhaustive bit search over {Q}^{K} combinations exceeds {EXHAUSTIVE_LIMIT}; "
                              "use allocation.bits_search=greedy")
    best: Allocation | None = None
    for combo in itertools.product(range(Q), repeat=K):
        idx = np.array(combo)
        if not _feasible_bits(problem, idx):
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
