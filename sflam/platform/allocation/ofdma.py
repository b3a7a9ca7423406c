"""OFDMA: each device gets a whole number of the band's N equal subchannels (docs/concepts/allocator.md, the paper's
matching).

For a stage of the lockstep at a fixed length T, the devices' uplink energies are separable and convex in
their bandwidth, so in whole subchannels each device's energy is discretely convex: giving every device its
fewest feasible subchannels, then each remaining subchannel to the device whose energy falls most (a
many-to-one matching of subchannels to devices by marginal gain), is optimal for that T. The stage length
is then re-optimised for the assignment, and the two alternate until the assignment repeats; a last pass
moves single subchannels between devices while that lowers the stage objective (swap matching, for up to
SWAP_LIMIT devices). The continuous FDMA optimum of the same stage is a lower bound.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq

from sflam.platform.allocation.links import BlockSolution, Links
from sflam.platform.allocation.problem import MAX_X, AllocationError
from sflam.platform.system import LN2

SWAP_LIMIT = 32  # devices up to which the exact single-move improvement pass runs


def solve_fixed_bandwidth(links: Links, b: np.ndarray, horizon: float) -> BlockSolution:
    """The best stage length and uplink energies when every device's bandwidth is fixed."""
    w_time, w_energy = links.weights
    down = links.downlink_s(b)
    T_min = float(np.max(links.c + down + links.full_power_s(b)))
    if not np.isfinite(T_min) or T_min > horizon * (1 + 1e-12):
        return BlockSolution(T_min, b, np.full_like(b, np.inf), np.inf)

    def slope(T: float) -> float:  # dJ/dT: latency weight + the energy's (negative) marginal value of time
        tau = T - links.c - down
        u = tau * b
        x = np.minimum(links.S / np.where(u > 0, u, 1e-300), MAX_X)
        two_x = np.exp2(x)
        marginal = np.where(links.S > 0, links.coef * b * (two_x - 1.0 - x * LN2 * two_x), 0.0)
        return w_time + w_energy * float(np.sum(marginal))

    T = T_min
    if w_energy > 0 and slope(T_min * (1 + 1e-12)) < 0:
        T = horizon if slope(horizon) <= 0 else brentq(slope, T_min * (1 + 1e-12), horizon, xtol=T_min * 1e-10,
                                                        rtol=1e-10)
    energy = links.energy(T - links.c - down, b)
    if np.any(energy > links.uplink_cap * (1 + 1e-9)):
        return BlockSolution(T, b, energy, np.inf)
    return BlockSolution(T, b, energy, w_time * T + w_energy * float(np.sum(energy)))


def _energies(links: Links, T: float, unit: float, N: int) -> np.ndarray:
    """(K, N): each device's uplink energy at T with 1..N subchannels (inf where it cannot finish in time)."""
    b = np.arange(1, N + 1, dtype=np.float64)[:, None] * unit  # (N, 1) broadcasts against the (K,) link arrays
    b = np.broadcast_to(b, (N, links.g.shape[0]))
    tau = T - links.c - links.downlink_s(b)
    feasible = tau >= links.full_power_s(b) * (1 - 1e-12)
    energy = links.energy(np.maximum(tau, 1e-300), b)
    return np.where(feasible & (energy <= links.uplink_cap), energy, np.inf).T


def _greedy(links: Links, T: float, N: int) -> np.ndarray | None:
    """The optimal whole-subchannel assignment at stage length T, or None if the devices cannot all finish."""
    unit = links.p.bandwidth_hz / N
    energy = _energies(links, T, unit, N)
    feasible = np.isfinite(energy)
    if not feasible.any(axis=1).all():
        return None
    least = feasible.argmax(axis=1) + 1  # fewest subchannels that finish in time
    spare = N - int(least.sum())
    if spare < 0:
        return None
    with np.errstate(invalid="ignore"):  # inf - inf where a device cannot finish with n subchannels
        gain = energy[:, :-1] - energy[:, 1:]  # energy saved by the (n+1)-th subchannel, falling in n
    gain = np.where(np.isfinite(gain) & (np.arange(1, N)[None, :] >= least[:, None]), gain, -np.inf)
    counts = least.copy()
    if spare:
        flat = np.argpartition(-gain.ravel(), spare - 1)[:spare]
        counts += np.bincount(flat // (N - 1), minlength=counts.size)
    return counts


def match_stage(links: Links, relaxed: BlockSolution, N: int, horizon: float) -> tuple[BlockSolution, np.ndarray]:
    """Whole subchannels for one stage, starting from the continuous optimum's stage length."""
    K = links.g.shape[0]
    if K > N:
        raise AllocationError(f"{K} devices cannot share {N} subchannels; raise system.subchannels to at least {K}")
    unit = links.p.bandwidth_hz / N
    T = relaxed.T
    best: BlockSolution | None = None
    counts = previous = None
    for _ in range(30):  # alternate: the assignment for the stage length, the stage length for the assignment
        assigned = _greedy(links, T, N)
        if assigned is None:  # the relaxed length is too short for whole subchannels: the least one that fits
            if _greedy(links, horizon, N) is None:
                raise AllocationError(f"no assignment of {N} subchannels finishes a stage within {horizon:.4g} s")
            lo, hi = T, horizon
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                lo, hi = (lo, mid) if _greedy(links, mid, N) is not None else (mid, hi)
            T = hi
            assigned = _greedy(links, T, N)
            assert assigned is not None
        solution = solve_fixed_bandwidth(links, assigned * unit, horizon)
        if best is None or solution.objective < best.objective:
            best, counts = solution, assigned
        if previous is not None and np.array_equal(assigned, previous):
            break
        previous, T = assigned, solution.T
    assert best is not None and counts is not None
    if K <= SWAP_LIMIT:  # swap matching: move single subchannels while that lowers the objective
        for _ in range(N * K):
            candidates = [(i, j) for i in range(K) if counts[i] > 1 for j in range(K) if j != i]
            trials = []
            for i, j in candidates:
                moved = counts.copy()
                moved[i] -= 1
                moved[j] += 1
                trials.append((solve_fixed_bandwidth(links, moved * unit, horizon), moved))
            if not trials:
                break
            solution, moved = min(trials, key=lambda t: t[0].objective)
            if solution.objective >= best.objective * (1 - 1e-12):
                break
            best, counts = solution, moved
    return best, counts


def equal_counts(K: int, N: int) -> np.ndarray:
    """N subchannels over K devices as evenly as whole numbers allow."""
    if K > N:
        raise AllocationError(f"{K} devices cannot share {N} subchannels; raise system.subchannels to at least {K}")
    return np.full(K, N // K) + (np.arange(K) < N % K)


def owners(counts: np.ndarray) -> np.ndarray:
    """Subchannel index -> device: device k holds a contiguous block of counts[k] subchannels."""
    return np.repeat(np.arange(counts.size), counts)
