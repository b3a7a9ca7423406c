"""One lockstep stage's links: capacity, transmission times, energy and power of every device in the stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sflam.platform.allocation import kernels
from sflam.platform.allocation.problem import MAX_X, AllocationProblem
from sflam.platform.system import LN2

# --------------------------------------------------------------------------- vectorised 1-D roots


def root_increasing(f: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray, iters: int = 80,
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


class Links:
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
        log_need, self.bmin_rate, feasible = kernels.min_bandwidth(
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

            need = np.maximum(need, np.exp(root_increasing(cap_slack, lo, hi, rtol=1e-9)))
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

        return np.exp(root_increasing(marginal, np.log(lower), np.log(upper), rtol=1e-6))


@dataclass
class BlockSolution:
    T: float
    bandwidth: np.ndarray
    uplink_energy: np.ndarray
    objective: float
    slope: float = float("nan")  # sign of dJ/dT as log(latency weight) - log(energy value of time); nan: unknown
