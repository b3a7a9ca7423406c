"""Compiled per-device kernels of one lockstep stage's power/bandwidth problem (docs/concepts/allocator.md).

The allocator's inner work is the same small scalar computation for every device, repeated for every
stage length and bandwidth price its searches try: the least bandwidth that still meets the stage length
at full power, and the first two derivatives of a device's uplink energy in its bandwidth. numpy runs
these as some forty array passes each; compiled loops (numba) run them in one pass over the devices with
scalar Newton iterations per device, which is what makes a 10,000-device round plan in well under a second.
Formulas as in `allocation.links.Links`: capacity r(b) = b log2(1 + a/b), download time D(b) = S_d / r_d(b),
uplink energy e = (N0/g) u (2^(S/u) - 1) with u = b (T - c - D(b)).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

LN2 = math.log(2.0)
MAX_X = 1000.0  # spectral efficiency cap (bit/s/Hz), as in allocation.problem.MAX_X


@njit(cache=True)
def _capacity(b: float, a: float) -> tuple[float, float, float]:
    """r(b), r'(b), r''(b) of b log2(1 + a/b)."""
    lg = math.log2(1.0 + a / b)
    return b * lg, lg - a / (LN2 * (b + a)), -a * a / (LN2 * b * (b + a) ** 2)


@njit(cache=True)
def _downlink(b: float, Sd: float, a_dn: float) -> tuple[float, float, float]:
    """D(b), D'(b), D''(b) of the download time at the server's power."""
    if Sd <= 0.0:
        return 0.0, 0.0, 0.0
    r, dr, ddr = _capacity(b, a_dn)
    return Sd / r, -Sd * dr / (r * r), -Sd * (ddr / (r * r) - 2.0 * dr * dr / (r * r * r))


@njit(cache=True)
def _spare(y: float, T: float, S: float, Sd: float, c: float, a_up: float, a_dn: float) -> tuple[float, float]:
    """Spare time at bandwidth e^y and full power (available - needed) and its derivative in y."""
    b = math.exp(y)
    d, d1, _ = _downlink(b, Sd, a_dn)
    value = T - c - d
    slope = -b * d1
    if S > 0.0:
        r, dr, _ = _capacity(b, a_up)
        value -= S / r
        slope += b * S * dr / (r * r)
    return value, slope


@njit(cache=True)
def min_bandwidth(T: float, S: np.ndarray, Sd: np.ndarray, c: np.ndarray, a_up: np.ndarray, a_dn: np.ndarray,
                  log_lo: float, log_hi: float, start: np.ndarray, use_start: bool, xtol: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per device: log of the least bandwidth that finishes the stage by T at full power (the root of the
    increasing spare time, by Newton's method inside a shrinking bracket), d log b / dT there, and whether
    the device fits at all within the whole band (within rounding)."""
    K = S.shape[0]
    out = np.empty(K)
    rate = np.zeros(K)
    feasible = np.empty(K, dtype=np.bool_)
    b_hi = math.exp(log_hi)
    for k in range(K):
        d_hi, _, _ = _downlink(b_hi, Sd[k], a_dn[k])
        up_hi = S[k] / _capacity(b_hi, a_up[k])[0] if S[k] > 0.0 else 0.0
        spare_hi = T - c[k] - d_hi - up_hi
        feasible[k] = spare_hi >= -1e-12 * up_hi
        if S[k] == 0.0 and Sd[k] == 0.0 and T >= c[k]:  # nothing to send: no bandwidth needed
            out[k] = log_lo
            continue
        if spare_hi <= 0.0:  # short of time even with the whole band
            out[k] = log_hi
            continue
        lo, hi = log_lo, log_hi
        x = min(max(start[k], lo), hi) if use_start else 0.5 * (lo + hi)
        slope = 0.0
        for _ in range(200):
            f, slope = _spare(x, T, S[k], Sd[k], c[k], a_up[k], a_dn[k])
            if f < 0.0 or math.isnan(f):
                lo = x
            else:
                hi = x
            tol = xtol * max(1.0, abs(x))
            step = x - f / slope if slope != 0.0 else math.nan
            if math.isfinite(step) and ((lo < step < hi) or abs(step - x) <= tol):
                new = step
            else:
                new = 0.5 * (lo + hi)
            if abs(f) <= 1e-14 * T:  # met to rounding: the step would not move x
                new = x
            done = abs(new - x) <= tol
            x = new
            if done:
                break
        out[k] = x
        rate[k] = -1.0 / slope if slope > 0.0 else 0.0
    return out, rate, feasible


@njit(cache=True)
def energy_derivatives(b: np.ndarray, T: float, S: np.ndarray, Sd: np.ndarray, c: np.ndarray, coef: np.ndarray,
                       a_dn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """e'(b) (<= 0) and e''(b) (>= 0) of each device's uplink energy at stage length T."""
    K = b.shape[0]
    first = np.empty(K)
    second = np.empty(K)
    for k in range(K):
        d, d1, d2 = _downlink(b[k], Sd[k], a_dn[k])
        tau = T - c[k] - d
        u = tau * b[k]
        if u <= 0.0:
            first[k], second[k] = -math.inf, math.inf
            continue
        x = min(S[k] / u, MAX_X)
        two_x = 2.0**x
        h1 = two_x - 1.0 - x * LN2 * two_x
        h2 = (x * LN2) ** 2 * two_x / u
        u1 = tau - b[k] * d1
        u2 = -2.0 * d1 - b[k] * d2
        first[k] = coef[k] * h1 * u1
        second[k] = coef[k] * (h2 * u1 * u1 + h1 * u2)
    return first, second


@njit(cache=True)
def split_newton(b0: np.ndarray, nu0: float, b_min: np.ndarray, B: float, T: float, S: np.ndarray, Sd: np.ndarray,
                 c: np.ndarray, coef: np.ndarray, a_dn: np.ndarray, iters: int) -> tuple[np.ndarray, float, bool]:
    """Optimal shares at stage length T: Newton's method on the KKT system e_k'(b_k) + nu = 0 (devices above
    their minimum), sum b = B. The Jacobian is arrow-shaped, so the price's step has a closed form and a
    step costs one pass over the devices; a device stays at its minimum while its marginal energy does not
    pay the price, and each step is damped to a factor 4 per device. Returns (b, nu, converged)."""
    K = b0.shape[0]
    b = np.empty(K)
    total = 0.0
    for k in range(K):
        b[k] = min(max(b0[k], b_min[k]), B)
        total += b[k]
    for k in range(K):
        b[k] = max(b_min[k], b[k] * (B / total))
    nu = nu0
    for _ in range(iters):
        first, second = energy_derivatives(b, T, S, Sd, c, coef, a_dn)
        if not nu > 0.0:
            nu = float(np.median(-first[np.isfinite(first)]))
        sum_b = 0.0
        sum_inv = 0.0
        sum_g = 0.0
        free = np.empty(K, dtype=np.bool_)
        for k in range(K):
            sum_b += b[k]
            held = b[k] <= b_min[k] * (1.0 + 1e-12) and first[k] + nu >= 0.0
            ok = (not held) and math.isfinite(first[k]) and math.isfinite(second[k]) and second[k] > 0.0
            free[k] = ok
            if ok:
                sum_inv += 1.0 / second[k]
                sum_g += -first[k] / second[k]
        if sum_inv <= 0.0:
            return b, nu, False
        residual = B - sum_b
        new_nu = (sum_g - residual) / sum_inv
        kkt, move = 0.0, 0.0
        for k in range(K):
            if free[k]:
                kkt = max(kkt, abs(first[k] + new_nu) * b[k])
                nb = b[k] - (first[k] + new_nu) / second[k]
                nb = min(max(nb, max(b_min[k], 0.25 * b[k])), min(4.0 * b[k], B))
                move = max(move, abs(nb - b[k]) / b[k])
                b[k] = nb
        nu = new_nu
        if abs(residual) <= 1e-10 * B and nu > 0.0 and kkt <= 1e-9 * nu * B and move <= 1e-7:
            return b, nu, True
    return b, nu, False
