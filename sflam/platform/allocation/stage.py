"""One stage's power/bandwidth block solved exactly: shares by Newton on the KKT system, length by its slope."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from sflam.platform.allocation import kernels
from sflam.platform.allocation.links import BlockSolution, Links
from sflam.platform.allocation.problem import MAX_X, AllocationError
from sflam.platform.system import LN2


def stage_objective(links: Links, T: float, uplink_energy: np.ndarray) -> float:
    w_time, w_energy = links.weights
    return w_time * T + w_energy * float(np.sum(uplink_energy))


def split_newton(links: Links, T: float, b_min: np.ndarray, iters: int = 40
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
    b, nu, converged = kernels.split_newton(b0, nu0, b_min, B, float(T), links.S, links.Sd, links.c,
                                                  links.coef, links.a_dn, iters)
    if not converged or nu <= 0 or not np.all(np.isfinite(b)):
        return None
    links.b_hint, links.nu_hint = b, nu
    return b * min(1.0, B / float(np.sum(b))), nu


def split_bandwidth(links: Links, T: float, b_min: np.ndarray, newton: bool = True) -> tuple[np.ndarray, float]:
    """Optimal bandwidth shares at stage length T and their price nu (the shares sum to B): the compiled
    Newton step on the KKT system, else (no convergence, or `newton=False`) nested roots, each bracketed:
    the price by a safeguarded Newton, each device's share by Illinois."""
    B = links.p.bandwidth_hz
    if links.p.size == 1:
        return np.array([B]), float(-links.energy_slope(np.array([B]), T)[0])
    if newton and float(np.sum(b_min)) < B * (1 - 1e-12):
        fast = split_newton(links, T, b_min)
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


def latency_slope(links: Links, T: float, b: np.ndarray, b_min: np.ndarray, nu: float) -> float:
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


def solve_at(links: Links, T: float) -> BlockSolution:
    b_min = links.min_bandwidth(T)
    if not np.all(np.isfinite(b_min)) or float(np.sum(b_min)) > links.p.bandwidth_hz * (1 + 1e-9):
        return BlockSolution(T, b_min, np.full_like(b_min, np.inf), np.inf)
    b, nu = split_bandwidth(links, T, b_min)
    energy = links.energy_at(b, T)
    slope = latency_slope(links, T, b, b_min, nu) if links.p.energy_cap_j is None else float("nan")
    return BlockSolution(T, b, energy, stage_objective(links, T, energy), slope)


def min_latency(links: Links, horizon: float) -> float:
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
    width = z - a
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
        # safeguarded: a Newton step that did not halve the bracket (it can creep up on the root from the
        # infeasible side, an ulp at a time, and leave the feasible end stale) is followed by a bisection
        if not a < step < z or z - a > 0.5 * width:
            step = 0.5 * (a + z)
        width = z - a
        if z - a <= 1e-12 * max(1.0, abs(z)):
            break
        x = step
    T = float(np.exp(z))  # the feasible end of the bracket
    links.T_min_hint = T
    return T


def minimise_latency_objective(links: Links, T_min: float, horizon: float, at_min: BlockSolution
                                ) -> BlockSolution:
    """J(T) is convex: its minimiser is T_min, the horizon, or the root of dJ/dT between them."""
    if at_min.slope >= 0:
        return at_min
    seen: dict[float, BlockSolution] = {}  # by log(T - T_min): the search's end points are solved once

    def solve(log_gap: float) -> BlockSolution:
        if log_gap not in seen:
            seen[log_gap] = solve_at(links, T_min + float(np.exp(log_gap)))
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


def solve_stage(links: Links, T_min: float, horizon: float) -> BlockSolution:
    """One stage's optimal length, bandwidth shares and uplink energies."""
    best = solve_at(links, T_min)
    if links.weights[1] <= 0 or horizon <= T_min * (1 + 1e-9):
        return best
    if np.isfinite(best.slope):
        return minimise_latency_objective(links, T_min, horizon, best)
    # energy caps make the slope unknown: a bounded scalar search of the convex stage objective
    found = minimize_scalar(lambda T: solve_at(links, float(T)).objective, bounds=(T_min, horizon),
                            method="bounded", options={"xatol": T_min * 1e-7, "maxiter": 200})
    return min([best, solve_at(links, float(found.x)), solve_at(links, horizon)], key=lambda s: s.objective)
