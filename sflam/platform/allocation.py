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
bandwidth price nu (each device: e_k'(b_k) = -nu; sum b_k = B) by Newton's method on the whole KKT system
(its Jacobian is arrow-shaped: a step is one pass over the devices), with nested bracketed roots as the
fallback; the optimal value is convex in m and its slope (envelope theorem) is driven to zero by secant
steps and Illinois false position, warm-started from the last solution. Each device's least bandwidth at
full power is a per-device Newton root inside a shrinking bracket. The per-device loops are compiled
(`stage_kernels`, numba). The bits block alternates with it (block coordinate descent): given the
stages' (b, m), each device's uplink energy at each bit width is known; a Lagrangian price on distortion
picks the bits, a greedy pass (a heap of each device's best move) spends what budget is left, and the
block is kept when the objective falls.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from sflam.platform import stage_kernels
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
        self.S = np.ascontiguousarray(uplink_bits, dtype=np.float64)
        self.Sd = np.ascontiguousarray(downlink_bits, dtype=np.float64)
        self.c = np.ascontiguousarray(compute_s, dtype=np.float64)
        self.a_up = np.ascontiguousarray(problem.max_power_w * self.g / problem.n0)
        self.a_dn = np.ascontiguousarray(problem.server_power_w * self.g / problem.n0)
        self.coef = np.ascontiguousarray(problem.n0 / self.g)  # energy = coef * u * (2^(S/u) - 1), u = tau * b
        self.uplink_cap = uplink_cap_j  # uplink energy the device's cap leaves to this stage
        self.b_floor = problem.bandwidth_hz * 1e-12
        self.weights = weights  # (latency weight per second, energy weight per joule)
        self.nu_hint: float | None = None
        self.bmin_hint: np.ndarray | None = None  # log of the last minimum bandwidths (a nearby T's)
        self.b_hint: np.ndarray | None = None     # the last optimal shares (a nearby T's)
        self.bmin_rate = np.zeros_like(self.g)    # d log b_min / dT at the last minimum bandwidths
        self.T_hint: float | None = None          # the last optimal stage length (for fixed bits nearby)
        self.T_min_hint: float | None = None      # the last least feasible stage length

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
        # cold start at the equal share (the least bandwidths are of its order), else the last T's roots
        hint = self.bmin_hint if self.bmin_hint is not None else np.full_like(self.g, np.log(B / self.g.shape[0]))
        log_need, self.bmin_rate, feasible = stage_kernels.min_bandwidth(
            float(T), self.S, self.Sd, self.c, self.a_up, self.a_dn, float(lo[0]), float(hi[0]), hint, True, 1e-10)
        self.bmin_hint = log_need
        need = np.exp(log_need)
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


def _split_newton(links: _Links, T: float, b_min: np.ndarray, iters: int = 40
                  ) -> tuple[np.ndarray, float] | None:
    """The optimal shares at stage length T by Newton's method on the whole KKT system at once.

    Stationarity e_k'(b_k) + nu = 0 for the devices above their minimum and sum b = B: the Jacobian is
    arrow-shaped (diagonal e_k'' plus the price's row and column), so a step costs O(K) and the price's
    step has a closed form. A device whose Newton step would fall below its minimum stays there while its
    marginal energy does not pay the price. Warm-started from the last nearby stage length, two to four
    steps reach the tolerance; None when it does not converge (the caller falls back to nested roots).
    """
    B = links.p.bandwidth_hz
    b0 = links.b_hint if links.b_hint is not None else np.full_like(b_min, B / b_min.shape[0])
    nu0 = links.nu_hint if links.nu_hint is not None else float("nan")
    b, nu, converged = stage_kernels.split_newton(b0, nu0, b_min, B, float(T), links.S, links.Sd, links.c,
                                                  links.coef, links.a_dn, iters)
    if not converged or nu <= 0 or not np.all(np.isfinite(b)):
        return None
    links.b_hint, links.nu_hint = b, nu
    return b * min(1.0, B / float(np.sum(b))), nu


def _split_bandwidth(links: _Links, T: float, b_min: np.ndarray, newton: bool = True) -> tuple[np.ndarray, float]:
    """Optimal bandwidth shares at stage length T and their price nu (the shares sum to B): the compiled
    Newton step on the KKT system, else (no convergence, or `newton=False`) nested roots, each bracketed:
    the price by a safeguarded Newton, each device's share by Illinois."""
    B = links.p.bandwidth_hz
    if links.p.size == 1:
        return np.array([B]), float(-links.energy_slope(np.array([B]), T)[0])
    if newton and float(np.sum(b_min)) < B * (1 - 1e-12):
        fast = _split_newton(links, T, b_min)
        if fast is not None:
            return fast
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

    def fits(log_T: float) -> tuple[float, np.ndarray, float]:
        """log B - log sum b_min(T) (>= 0: the minimum bandwidths fit), with b_min and their sum."""
        need = links.min_bandwidth(float(np.exp(log_T)))
        total = float(np.sum(need))
        return (float(np.log(B) - np.log(total)) if np.isfinite(total) else -np.inf), need, total

    if horizon <= lower or fits(np.log(horizon))[0] < 0:
        raise AllocationError(f"no allocation finishes the round within {horizon:.4g} s under the bandwidth, "
                              "power and energy caps; raise allocation.deadline_s or allocation.energy_cap_j")
    # the infinite-bandwidth bound fits only when a device with nothing to send attains it (one that
    # sends would need an infinite band there)
    quiet = (links.S == 0) & (links.Sd == 0)
    if quiet.any() and float(np.max(links.c[quiet])) >= lower and fits(np.log(lower))[0] >= 0:
        return lower
    # Newton on log T inside the bracket: d/dlogT log sum b_min = T sum(b_min * dlog b_min/dT) / sum b_min
    a, z = float(np.log(lower)), float(np.log(horizon))
    # start from the last least stage length (nearby bits), else from twice the infinite-bandwidth bound
    x = float(np.log(links.T_min_hint)) if links.T_min_hint is not None and lower < links.T_min_hint < horizon \
        else min(a + float(np.log(2.0)), z)
    for _ in range(100):
        value, need, total = fits(x)
        if value >= 0:
            z = x
        else:
            a = x
        if value >= 0 and value <= 1e-9:
            break
        slope = -float(np.exp(x)) * float(np.sum(need * links.bmin_rate)) / total if np.isfinite(total) else 0.0
        step = x - value / slope if slope > 0 and np.isfinite(value) else float("nan")
        if not a < step < z:
            step = 0.5 * (a + z)
        if z - a <= 1e-12 * max(1.0, abs(z)):
            break
        x = step
    T = float(np.exp(z))  # the feasible end of the bracket
    links.T_min_hint = T
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
    # bracket the root from a guess (the last solution for nearby bits, else T = 2 T_min), widening the
    # step until the slope changes sign: a few solves instead of searching the whole range
    guess = float(np.log(links.T_hint - T_min)) if links.T_hint is not None and links.T_hint > T_min else \
        float(np.log(T_min))
    x0 = min(max(guess, low), high)
    s0 = slope(x0)
    if s0 < 0 and x0 >= high:
        return min([solve(high), at_min], key=lambda sol: sol.objective)
    if s0 >= 0 and x0 <= low:
        return at_min
    # secant steps (at most a factor e^2 in the gap each) until the slope changes sign
    x1 = min(max(x0 + (0.1 if s0 < 0 else -0.1), low), high)
    s1 = slope(x1)
    for _ in range(60):
        if (s0 < 0) != (s1 < 0):
            break
        if s1 < 0 and x1 >= high:
            return min([solve(high), at_min], key=lambda sol: sol.objective)
        if s1 >= 0 and x1 <= low:
            return at_min
        step = -s1 * (x1 - x0) / (s1 - s0) if s1 != s0 else float("nan")
        toward = 1.0 if s1 < 0 else -1.0
        step = toward * min(max(abs(step) * 1.5, 0.1), 2.0) if np.isfinite(step) and step * toward > 0 else 2.0 * toward
        x0, s0 = x1, s1
        x1 = min(max(x1 + step, low), high)
        s1 = slope(x1)
    # Illinois false position inside the bracket; J is flat at its minimum, so a slope within 1e-3 of zero
    # (the marginal energy value of time within 0.1 % of its price) is the optimum to second order
    (a, fa), (z, fz) = sorted([(x0, s0), (x1, s1)])
    x, fx, side = a, fa, 0
    for _ in range(100):
        if abs(fx) <= 1e-3 or z - a <= 1e-6:
            break
        x = (a * fz - z * fa) / (fz - fa) if fz != fa else 0.5 * (a + z)
        if not a < x < z:
            x = 0.5 * (a + z)
        fx = slope(x)
        if fx < 0:
            a, fa = x, fx
            if side < 0:
                fz *= 0.5
            side = -1
        else:
            z, fz = x, fx
            if side > 0:
                fa *= 0.5
            side = 1
    best = solve(x)
    links.T_hint = best.T
    return min([best, at_min], key=lambda sol: sol.objective)


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


HINTS = ("T_hint", "T_min_hint", "nu_hint", "b_hint", "bmin_hint")


def _stages(problem: AllocationProblem, uplink: np.ndarray, ref: tuple[float, float],
            hints: dict[int, dict[str, object]] | None = None) -> _Stages:
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
    for j, lk in enumerate(links):  # warm starts from the same stage under nearby bits
        for name, value in (hints or {}).get(j, {}).items():
            setattr(lk, name, value)
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


def _solve_block(problem: AllocationProblem, uplink: np.ndarray, ref: tuple[float, float],
                 hints: dict[int, dict[str, object]] | None = None) -> tuple[list[_BlockSolution], _Stages, float]:
    """Every stage for fixed bits; a latency price eta >= 0 keeps the makespan within the deadline (or cap).

    Returns the stages' solutions, the stages and eta. `hints` (per stage: the last stage length, price and
    shares) warm-starts the searches and is updated with this solution's."""
    stages = _stages(problem, uplink, ref, hints)
    try:
        return _solve_block_stages(problem, stages, ref)
    finally:
        if hints is not None:
            for j, lk in enumerate(stages.links):
                hints[j] = {name: getattr(lk, name) for name in HINTS}


def _solve_block_stages(problem: AllocationProblem, stages: _Stages, ref: tuple[float, float]
                        ) -> tuple[list[_BlockSolution], _Stages, float]:
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
                          reference: tuple[float, float] | None = None,
                          hints: dict[int, dict[str, object]] | None = None) -> Allocation:
    """The optimal power and bandwidth for fixed bits (the convex block), as a full allocation; with OFDMA,
    whole subchannels matched from the continuous optimum (its objective is then a lower bound). `hints`
    carries warm starts between calls for nearby bits (block coordinate descent)."""
    ref = reference or reference_costs(problem)
    uplink = problem.stage_uplink(np.asarray(bits_index))
    bits = problem.bits_options[np.asarray(bits_index)]
    sols, stages, eta = _solve_block(problem, uplink, ref, hints)
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

    rows = np.arange(K)
    budget = problem.distortion_budget * (1 + 1e-12)

    def pick(eta: float) -> np.ndarray:
        return np.argmin(cost + eta * weight, axis=1)

    def feasible(idx: np.ndarray) -> bool:  # = _feasible_bits, from the precomputed w_k D(q) table
        return float(np.sum(weight[rows, idx])) <= budget

    base = float(np.nanmax(np.where(np.isfinite(cost), cost, np.nan))) if np.isfinite(cost).any() else 1.0
    hi = base / max(float(np.min(weight[weight > 0], initial=1e-300)), 1e-300)
    if not feasible(pick(hi)):
        return _indices(problem, current.bits)
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
    return _spend_budget(problem, cost, weight, idx)


def _spend_budget(problem: AllocationProblem, cost: np.ndarray, weight: np.ndarray, idx: np.ndarray) -> np.ndarray:
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
        return _exhaustive(problem, ref)
    idx = _start_bits(problem)
    hints: dict[int, dict[str, object]] = {}
    best = solve_power_bandwidth(problem, idx, ref, hints)
    for _ in range(max_iters):
        candidate_idx = _bits_block(problem, best)
        if np.array_equal(candidate_idx, _indices(problem, best.bits)):
            break
        candidate = solve_power_bandwidth(problem, candidate_idx, ref, hints)
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
