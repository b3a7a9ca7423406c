"""Joint allocation of activation bits, transmit power and bandwidth per device in a round (DESIGN §7).

    minimise  lam * T / T0 + (1 - lam) * E / E0
    over      q_k in Q, p_kj in [0, P_max], b_kj >= 0,   sum_k b_kj <= B in every stage j,
              sum_k w_k D(q_k) <= eps,  optional per-device energy caps,  T <= T_max,

with T the makespan of the lockstep round the runtime executes (DESIGN §5-6) and E the devices'
energy; T0, E0 are the values of the equal allocation at fp32 (b = B/K, P_max, q = 32), so lam is
unit-free.

The lockstep round is a chain of J = E + 1 stages separated by the server's barriers: stage 0 is the
adapter download, the first forward and the first uplink; stage e is the gradient download of step e,
the backward, the next forward and its uplink; the last stage is the last gradient download, the last
backward and the adapter upload. A stage lasts as long as its slowest device, so

    T = sum_j max_k (c_kj + D_kj(b_kj) + tau_kj) + server time,

a sum of maxima of convex functions of (tau, b). The base station assigns each stage's transmissions
their own bandwidth share and power (as it re-assigns resource blocks every scheduling interval), so
for fixed bits the block separates into one convex problem per stage, coupled only through a round
deadline (a latency price eta found by bisection). Each stage is solved exactly: the uplink energy
tau (N0 b / g)(2^(S / (tau b)) - 1) is jointly convex in (tau, b), the power cap is
tau >= S / (b log2(1 + P_max g / (N0 b))), the downlink time at server power is convex decreasing in b.
Energy falls with time, so every device uses its whole slack: tau_kj = m_j - c_kj - D_kj(b_kj). For a
stage length m the problem is a separable convex resource allocation over b, solved through its
bandwidth price nu (each device: e_k'(b_k) = -nu; sum b_k = B); the optimal value is convex in m and
Brent's method finds where its slope vanishes (envelope theorem). Every one-dimensional root is
bracketed and found with vectorised Illinois false position. The bits block alternates with it (block
coordinate descent): given the stages' (b, m), each device's uplink energy at each bit width is known;
a Lagrangian price on distortion picks the bits, a greedy pass spends what budget is left, and the
block is kept when the objective falls.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from sflam.platform.config import EXHAUSTIVE_LIMIT
from sflam.platform.errors import SflamError
from sflam.platform.system import LN2

MAX_X = 1000.0  # spectral efficiency cap (bit/s/Hz) that keeps 2^x finite


class AllocationError(SflamError):
    """No allocation satisfies the constraints (deadline, energy caps, bandwidth)."""


def distortion(bits: np.ndarray | float) -> np.ndarray:
    """The codec's per-element variance bound relative to the row range squared: Δ²/4 / range² (0 at 32 bits).

    Δ = range / (2^q - 1) is the codec's actual step (its side information never widens it, DESIGN §4).
    """
    q = np.asarray(bits, dtype=np.float64)
    return np.where(q >= 32, 0.0, 1.0 / (4.0 * (2.0 ** np.minimum(q, 31) - 1.0) ** 2))


@dataclass(frozen=True)
class AllocationProblem:
    """One round's selected devices, stage by stage; arrays are per device (K) and per stage (J = E + 1)."""

    gain: np.ndarray                 # (K,) channel power gain g_k
    uplink_bits: np.ndarray          # (K, J, Q): each stage's uplink payload at each bit option
    downlink_bits: np.ndarray        # (K, J): each stage's download at the server power
    compute_s: np.ndarray            # (K, J): device computation inside each stage
    server_s: float                  # the server's steps, on the critical path between the stages
    compute_energy_j: np.ndarray     # (K,) device compute energy of the round
    bits_options: np.ndarray         # (Q,) allowed activation bit widths
    raw_uplink_bits: np.ndarray      # (K, J) uplink payload at fp32 (for the reference T0, E0)
    distortion_weight: np.ndarray    # (K,) w_k, sums to 1 (share of the round's activation elements)
    distortion_budget: float         # eps
    bandwidth_hz: float
    max_power_w: float
    server_power_w: float
    n0: float
    lam: float = 0.5
    deadline_s: float | None = None
    max_latency_factor: float = 10.0
    energy_cap_j: float | None = None
    subchannels: int | None = None  # OFDMA: N equal subchannels, whole ones per device; None: FDMA shares

    @property
    def size(self) -> int:
        return int(self.gain.shape[0])

    @property
    def stages(self) -> int:
        return int(self.downlink_bits.shape[1])

    def option_index(self, bits: int) -> int:
        matches = np.flatnonzero(self.bits_options == bits)
        if matches.size == 0:
            raise ValueError(f"{bits} bits is not among the options {self.bits_options.tolist()}")
        return int(matches[0])

    def stage_uplink(self, bits_index: np.ndarray) -> np.ndarray:
        """(K, J) uplink payloads at the chosen bit options."""
        return self.uplink_bits[np.arange(self.size), :, bits_index]


@dataclass(frozen=True)
class Allocation:
    """A round's plan and what it costs, per device and stage, and in total."""

    bits: np.ndarray                 # (K,)
    stage_power_w: np.ndarray        # (K, J) transmit power in each stage's uplink
    stage_bandwidth_hz: np.ndarray   # (K, J) bandwidth share in each stage
    uplink_s: np.ndarray             # (K, J) uplink transmission time per stage
    downlink_s: np.ndarray           # (K, J) download time per stage
    stage_s: np.ndarray              # (J,) stage lengths (the slowest device of each stage)
    latency_s: np.ndarray            # (K,) when each device finishes the round (its adapter is up)
    uplink_energy_j: np.ndarray      # (K,)
    energy_j: np.ndarray             # (K,) compute + uplink
    round_latency_s: float           # the lockstep makespan
    total_energy_j: float
    objective: float
    reference: tuple[float, float] = field(default=(1.0, 1.0))  # (T0, E0)
    stage_subchannels: np.ndarray | None = None  # (K, J) whole subchannels per device and stage (OFDMA)
    relaxation_gap: float | None = None  # objective / continuous FDMA optimum - 1 (OFDMA)

    @property
    def power_w(self) -> np.ndarray:
        """Each device's mean transmit power over its uplink time (energy / time)."""
        time = self.uplink_s.sum(axis=1)
        return np.where(time > 0, self.uplink_energy_j / np.where(time > 0, time, 1.0), 0.0)

    @property
    def bandwidth_hz(self) -> np.ndarray:
        """Each device's bandwidth share averaged over the stages it transmits in."""
        return self.stage_bandwidth_hz.mean(axis=1)


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


# --------------------------------------------------------------------------- one stage's power/bandwidth block


class _Links:
    """One stage's per-device link quantities for fixed uplink payloads S (vectorised over devices)."""

    def __init__(self, problem: AllocationProblem, uplink_bits: np.ndarray, downlink_bits: np.ndarray,
                 compute_s: np.ndarray, uplink_cap_j: np.ndarray, weights: tuple[float, float]) -> None:
        self.p = problem
        self.g = problem.gain.astype(np.float64)
        self.S = uplink_bits.astype(np.float64)
        self.Sd = downlink_bits.astype(np.float64)
        self.c = compute_s.astype(np.float64)
        self.a_up = problem.max_power_w * self.g / problem.n0
        self.a_dn = problem.server_power_w * self.g / problem.n0
        self.coef = problem.n0 / self.g  # energy = coef * u * (2^(S/u) - 1), u = tau * b
        self.uplink_cap = uplink_cap_j  # uplink energy the device's cap leaves to this stage
        self.b_floor = problem.bandwidth_hz * 1e-12
        self.weights = weights  # (latency weight per second, energy weight per joule)
        self.nu_hint: float | None = None

    @property
    def idle(self) -> bool:
        """Nothing travels in this stage: its length is the slowest computation."""
        return not (self.S.any() or self.Sd.any())

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
        return np.where(u > 0, self.coef * u * np.expm1(x * LN2), np.where(self.S > 0, np.inf, 0.0))

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
        x = np.minimum(self.S / np.where(tau * b > 0, tau * b, 1e-300), MAX_X)
        return np.where(self.S > 0, self.coef * b * np.expm1(x * LN2), 0.0)

    # feasibility -------------------------------------------------------------
    def min_bandwidth(self, T: float) -> np.ndarray:
        """Least b per device that finishes by T within the power cap (and energy cap); inf if none <= B."""
        B = self.p.bandwidth_hz
        lo = np.full_like(self.g, np.log(self.b_floor))
        hi = np.full_like(self.g, np.log(B))

        def slack(log_b: np.ndarray) -> np.ndarray:  # log(available time / time needed), increasing
            b = np.exp(log_b)
            available = self.uplink_time(b, T)
            needed = self.full_power_s(b)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(available > 0, np.log(np.maximum(available, 1e-300))
                                - np.log(np.maximum(needed, 1e-300)), -np.inf)

        need = np.exp(_root_increasing(slack, lo, hi, rtol=1e-7))
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
        """No stage length below this is feasible: infinite bandwidth at full power up and down."""
        up = self.S * self.p.n0 * LN2 / (self.p.max_power_w * self.g)
        down = self.Sd * self.p.n0 * LN2 / (self.p.server_power_w * self.g)
        return float(np.max(self.c + up + down))

    def bandwidth_at_price(self, nu: float, T: float, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """argmin over b in [lower, upper] of e(b) + nu b, per device (the bracket holds the minimiser)."""

        log_nu = np.log(nu)

        def marginal(log_b: np.ndarray) -> np.ndarray:  # log nu - log(-e'(b)), increasing in b
            with np.errstate(divide="ignore"):
                return log_nu - np.log(-self.energy_slope(np.exp(log_b), T))

        return np.exp(_root_increasing(marginal, np.log(lower), np.log(upper), rtol=1e-6))


@dataclass
class _BlockSolution:
    T: float
    bandwidth: np.ndarray
    uplink_energy: np.ndarray
    objective: float
    slope: float = float("nan")  # sign of dJ/dT as log(latency weight) - log(energy value of time); nan: unknown


def _stage_objective(links: _Links, T: float, uplink_energy: np.ndarray) -> float:
    w_time, w_energy = links.weights
    return w_time * T + w_energy * float(np.sum(uplink_energy))


def _split_bandwidth(links: _Links, T: float, b_min: np.ndarray) -> tuple[np.ndarray, float]:
    """Optimal bandwidth shares at stage length T and their price nu (the shares sum to B)."""
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
    # Safeguarded Newton on log nu: f = log B - log sum b(nu) rises with nu, f' = nu sum(1 / e_k'') / sum b
    # over the devices not at a bound; a step outside the bracket [a, z] bisects instead.
    a, z = float(np.log(max(nu_lo, 1e-300))), float(np.log(nu_hi))
    x = float(np.log(links.nu_hint)) if links.nu_hint is not None and a < np.log(links.nu_hint) < z else 0.5 * (a + z)
    for _ in range(100):
        nu = float(np.exp(x))
        b = links.bandwidth_at_price(nu, T, lower, upper)
        total = float(np.sum(b))
        if total > B:  # b(nu) falls as nu rises: every evaluated price narrows each device's bracket
            upper[:] = np.minimum(upper, b)
        else:
            lower[:] = np.maximum(lower, b)
        f = float(np.log(B) - np.log(total))
        if abs(f) <= 1e-6:  # the shares are found to ~1e-6; errors here cost the objective only squared
            break
        if f > 0:
            z = x
        else:
            a = x
        free = (b > b_min * (1 + 1e-7)) & (b < B * (1 - 1e-9))
        h = 1e-5
        with np.errstate(divide="ignore", invalid="ignore"):
            curvature = (links.energy_slope(b * (1 + h), T) - links.energy_slope(b, T)) / (b * h)
            slope = nu * float(np.sum(np.where(free & (curvature > 0), 1.0 / curvature, 0.0))) / total
        step = x - f / slope if slope > 0 and np.isfinite(slope) else float("nan")
        if not a < step < z:
            step = 0.5 * (a + z)
        if abs(step - x) <= 1e-7 or z - a <= 1e-9:
            x = step
            break
        x = step
    nu = float(np.exp(x))
    links.nu_hint = nu
    b = links.bandwidth_at_price(nu, T, lower, upper)
    return b * min(1.0, B / float(np.sum(b))), nu


def _latency_slope(links: _Links, T: float, b: np.ndarray, b_min: np.ndarray, nu: float) -> float:
    """dJ/dT at the optimum for T (envelope theorem): the devices' marginal energy of time, plus the
    multipliers of the power caps that bind (a device held at its minimum bandwidth)."""
    tau = links.uplink_time(b, T)
    x = np.minimum(links.S / np.where(tau * b > 0, tau * b, 1e-300), MAX_X)
    two_x = np.exp2(x)
    de_dT = links.coef * b * (two_x - 1.0 - x * LN2 * two_x)
    bound = b <= b_min * (1 + 1e-9)
    if bound.any():
        cap = links._capacity(b, links.a_up)
        d_cap = np.log2(1.0 + links.a_up / b) - links.a_up / (LN2 * (b + links.a_up))
        g_slope = -links.S * d_cap / cap**2 + links.downlink_slope(b)
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = np.clip(np.nan_to_num(-(links.energy_slope(b, T) + nu) / g_slope), 0.0, None)
        de_dT = de_dT - np.where(bound, rho, 0.0)
    w_time, w_energy = links.weights
    marginal_energy = -w_energy * float(np.sum(de_dT))  # value of one more second, >= 0
    # log of (latency weight / energy value): increasing in T, zero at the optimum
    with np.errstate(divide="ignore"):
        return float(np.log(w_time) - np.log(marginal_energy)) if w_time > 0 else -np.inf


def _solve_at(links: _Links, T: float) -> _BlockSolution:
    b_min = links.min_bandwidth(T)
    if not np.all(np.isfinite(b_min)) or float(np.sum(b_min)) > links.p.bandwidth_hz * (1 + 1e-9):
        return _BlockSolution(T, b_min, np.full_like(b_min, np.inf), np.inf)
    b, nu = _split_bandwidth(links, T, b_min)
    energy = links.energy_at(b, T)
    slope = _latency_slope(links, T, b, b_min, nu) if links.p.energy_cap_j is None else float("nan")
    return _BlockSolution(T, b, energy, _stage_objective(links, T, energy), slope)


def _min_latency(links: _Links, horizon: float) -> float:
    """The least feasible stage length: the smallest T whose minimum bandwidths fit in B."""
    B = links.p.bandwidth_hz
    lower = links.latency_lower_bound()

    def fits(log_T: float) -> float:
        need = np.minimum(links.min_bandwidth(float(np.exp(log_T))), 2 * B)
        return float(np.log(B) - np.log(float(np.sum(need))))

    if horizon <= lower or fits(np.log(horizon)) < 0:
        raise AllocationError(f"no allocation finishes the round within {horizon:.4g} s under the bandwidth, "
                              "power and energy caps; raise allocation.deadline_s or allocation.energy_cap_j")
    if fits(np.log(lower)) >= 0:
        return lower
    T = float(np.exp(brentq(fits, np.log(lower), np.log(horizon), xtol=1e-10, rtol=1e-9)))
    for step in range(60):  # step onto the feasible side of the root
        if fits(np.log(T)) >= 0:
            break
        T *= 1 + 1e-12 * 2.0**step
    return T


def _minimise_latency_objective(links: _Links, T_min: float, horizon: float, at_min: _BlockSolution
                                ) -> _BlockSolution:
    """J(T) is convex: its minimiser is T_min, the horizon, or the root of dJ/dT between them."""
    if at_min.slope >= 0:
        return at_min
    seen: dict[float, _BlockSolution] = {}  # by log(T - T_min): the search's end points are solved once

    def solve(log_gap: float) -> _BlockSolution:
        if log_gap not in seen:
            seen[log_gap] = _solve_at(links, T_min + float(np.exp(log_gap)))
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
    best = solve(brentq(slope, low, high, xtol=1e-4, rtol=1e-6))  # J is flat at its minimum
    return min([best, at_min, at_end], key=lambda sol: sol.objective)


def _solve_stage(links: _Links, T_min: float, horizon: float) -> _BlockSolution:
    """One stage's optimal length, bandwidth shares and uplink energies."""
    best = _solve_at(links, T_min)
    if links.weights[1] <= 0 or horizon <= T_min * (1 + 1e-9):
        return best
    if np.isfinite(best.slope):
        return _minimise_latency_objective(links, T_min, horizon, best)
    # energy caps make the slope unknown: a bounded scalar search of the convex stage objective
    found = minimize_scalar(lambda T: _solve_at(links, float(T)).objective, bounds=(T_min, horizon),
                            method="bounded", options={"xatol": T_min * 1e-7, "maxiter": 200})
    return min([best, _solve_at(links, float(found.x)), _solve_at(links, horizon)], key=lambda s: s.objective)


@dataclass
class _Stages:
    """The stages of a round for fixed bits, with what does not change while the latency price moves."""

    links: list[_Links]
    T_min: np.ndarray
    cap: float


def _stages(problem: AllocationProblem, uplink: np.ndarray, ref: tuple[float, float]) -> _Stages:
    T0, E0 = ref
    weights = (problem.lam / T0, (1.0 - problem.lam) / E0)
    allowed = np.inf if problem.energy_cap_j is None else problem.energy_cap_j
    spare_energy = allowed - problem.compute_energy_j
    total_up = np.maximum(uplink.sum(axis=1), 1e-300)
    # an energy cap is shared among the stages in proportion to their uplink bits
    with np.errstate(invalid="ignore"):  # no cap: inf * 0 in stages without uplink, replaced by inf
        caps = [np.where(np.isfinite(spare_energy), spare_energy * uplink[:, j] / total_up, np.inf)
                for j in range(problem.stages)]
    links = [_Links(problem, uplink[:, j], problem.downlink_bits[:, j], problem.compute_s[:, j], caps[j], weights)
             for j in range(problem.stages)]
    cap = problem.deadline_s if problem.deadline_s is not None else problem.max_latency_factor * T0
    T_min = np.array([float(np.max(lk.c)) if lk.idle else _min_latency(lk, cap) for lk in links])
    if float(T_min.sum()) + problem.server_s > cap * (1 + 1e-12):
        raise AllocationError(f"no allocation finishes the round within {cap:.4g} s (the least is "
                              f"{float(T_min.sum()) + problem.server_s:.4g} s); raise allocation.deadline_s")
    return _Stages(links, T_min, cap)


def _solve_stages(stages: _Stages, server_s: float, extra_weight: float) -> list[_BlockSolution]:
    spare = stages.cap - server_s - float(stages.T_min.sum())
    out = []
    for links, T_min in zip(stages.links, stages.T_min, strict=True):
        if links.idle:
            K = links.g.shape[0]
            out.append(_BlockSolution(T_min, np.full(K, links.p.bandwidth_hz / K), np.zeros(K), 0.0))
            continue
        base = links.weights
        links.weights = (base[0] + extra_weight, base[1])
        try:
            out.append(_solve_stage(links, T_min, T_min + spare))
        finally:
            links.weights = base
    return out


def _solve_block(problem: AllocationProblem, uplink: np.ndarray, ref: tuple[float, float]
                 ) -> tuple[list[_BlockSolution], _Stages, float]:
    """Every stage for fixed bits; a latency price eta >= 0 keeps the makespan within the deadline (or cap).

    Returns the stages' solutions, the stages and eta."""
    stages = _stages(problem, uplink, ref)

    def total(sols: list[_BlockSolution]) -> float:
        return float(sum(s.T for s in sols)) + problem.server_s

    if problem.lam > 0:
        sols = _solve_stages(stages, problem.server_s, 0.0)
        if total(sols) <= stages.cap * (1 + 1e-9):
            return sols, stages, 0.0
    # the deadline binds: raise the price of time until the stages fit (the makespan falls as eta rises)
    T0 = ref[0]
    hi = 1.0 / T0
    sols = _solve_stages(stages, problem.server_s, hi)
    while total(sols) > stages.cap * (1 + 1e-9):
        hi *= 4.0
        sols = _solve_stages(stages, problem.server_s, hi)
    seen: dict[float, list[_BlockSolution]] = {np.log(hi): sols}

    def excess(log_eta: float) -> float:  # falls as eta rises; the root is where the makespan meets the cap
        if log_eta not in seen:
            seen[log_eta] = _solve_stages(stages, problem.server_s, float(np.exp(log_eta)))
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
                          reference: tuple[float, float] | None = None) -> Allocation:
    """The optimal power and bandwidth for fixed bits (the convex block), as a full allocation; with OFDMA,
    whole subchannels matched from the continuous optimum (its objective is then a lower bound)."""
    ref = reference or reference_costs(problem)
    uplink = problem.stage_uplink(np.asarray(bits_index))
    bits = problem.bits_options[np.asarray(bits_index)]
    sols, stages, eta = _solve_block(problem, uplink, ref)
    links = [_Links(problem, uplink[:, j], problem.downlink_bits[:, j], problem.compute_s[:, j],
                    np.full(problem.size, np.inf), (0.0, 0.0)) for j in range(problem.stages)]
    relaxed = _assemble(problem, links, bits, sols, ref)
    if problem.subchannels is None:
        return relaxed
    from sflam.platform.subchannels import equal_counts, match_stage

    N = problem.subchannels
    spare = stages.cap - problem.server_s - float(stages.T_min.sum())
    matched, counts = [], np.zeros((problem.size, problem.stages), dtype=np.int64)
    for j, (lk, sol, T_min) in enumerate(zip(stages.links, sols, stages.T_min, strict=True)):
        if lk.idle:
            counts[:, j] = equal_counts(problem.size, N)
            matched.append(_BlockSolution(sol.T, counts[:, j] * problem.bandwidth_hz / N, sol.uplink_energy, 0.0))
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
    whole = _assemble(problem, links, bits, matched, ref)
    return dataclasses.replace(whole, stage_subchannels=counts, relaxation_gap=whole.objective / relaxed.objective - 1)


def _assemble(problem: AllocationProblem, links: list[_Links], bits: np.ndarray, sols: list[_BlockSolution],
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
    return _priced(problem, bits, power, band, up, down, busy, ref)


def _priced(problem: AllocationProblem, bits: np.ndarray, power: np.ndarray, band: np.ndarray, up: np.ndarray,
            down: np.ndarray, busy: np.ndarray, ref: tuple[float, float]) -> Allocation:
    """Costs of a stage-by-stage plan under the lockstep: stages last as long as their slowest device."""
    stage = busy.max(axis=0)
    T = float(stage.sum()) + problem.server_s
    finish = float(stage[:-1].sum()) + problem.server_s + busy[:, -1]
    up_energy = (power * up).sum(axis=1)
    energy = problem.compute_energy_j + up_energy
    total = float(energy.sum())
    objective = problem.lam * T / ref[0] + (1 - problem.lam) * total / ref[1]
    return Allocation(np.asarray(bits, dtype=np.int64).copy(), power, band, up, down, stage, finish, up_energy,
                      energy, T, total, objective, ref)


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
        from sflam.platform.subchannels import equal_counts

        counts = np.repeat(equal_counts(K, problem.subchannels)[:, None], problem.stages, axis=1)
        b = counts * (problem.bandwidth_hz / problem.subchannels)
    power, up, down = np.zeros_like(b), np.zeros_like(b), np.zeros_like(b)
    for j in range(problem.stages):
        lk = _Links(problem, uplink_bits[:, j], problem.downlink_bits[:, j], problem.compute_s[:, j],
                   np.full(K, np.inf), (0.0, 0.0))
        up[:, j], down[:, j] = lk.full_power_s(b[:, j]), lk.downlink_s(b[:, j])
        power[:, j] = np.where(lk.S > 0, problem.max_power_w, 0.0)
    busy = problem.compute_s + up + down
    allocation = _priced(problem, bits_arr, power, b, up, down, busy, reference or (1.0, 1.0))
    if reference is None:  # its own reference: objective 1
        allocation = _priced(problem, bits_arr, power, b, up, down, busy,
                             (allocation.round_latency_s, allocation.total_energy_j))
    return dataclasses.replace(allocation, stage_subchannels=counts)


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
    """Bits given the stages' (b, m): each device's uplink energy per bit option, a distortion price, then greedy."""
    K, Q = problem.size, len(problem.bits_options)
    cost = np.zeros((K, Q))
    for q in range(Q):
        for j in range(problem.stages):
            lk = _Links(problem, problem.uplink_bits[:, j, q], problem.downlink_bits[:, j], problem.compute_s[:, j],
                       np.full(K, np.inf), (0.0, 0.0))
            b = current.stage_bandwidth_hz[:, j]
            tau = current.stage_s[j] - lk.c - lk.downlink_s(b)
            ok = tau >= lk.full_power_s(b) * (1 - 1e-12)
            e = lk.energy(np.maximum(tau, 1e-300), b)
            cost[:, q] += np.where(ok, e, np.inf)
    if problem.energy_cap_j is not None:
        cost = np.where(cost + problem.compute_energy_j[:, None] <= problem.energy_cap_j * (1 + 1e-9), cost, np.inf)
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


def allocate(problem: AllocationProblem, search: str = "greedy", max_iters: int = 10,
             reference: tuple[float, float] | None = None) -> Allocation:
    """The joint allocation: block coordinate descent over bits and (power, bandwidth), or enumeration."""
    ref = reference or reference_costs(problem)
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


def exhaustive_fits(options: int, devices: int) -> bool:
    """Whether enumerating every bit combination stays within EXHAUSTIVE_LIMIT."""
    return options**devices <= EXHAUSTIVE_LIMIT


def _exhaustive(problem: AllocationProblem, ref: tuple[float, float]) -> Allocation:
    Q, K = len(problem.bits_options), problem.size
    if not exhaustive_fits(Q, K):
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
