"""OFDMA subchannel assignment by matching (docs/concepts/allocator.md): whole subchannels, each used once, bounded
by FDMA."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from sflam.platform.allocation import allocate, equal_allocation, reference_costs, solve_power_bandwidth
from sflam.platform.allocation.block import solve_block as _solve_block
from sflam.platform.allocation.ofdma import match_stage, owners, solve_fixed_bandwidth
from sflam.platform.scenarios import random_problem


def compositions(total: int, parts: int):
    """Every way to give `parts` devices at least one of `total` subchannels, all of them used."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        edges = (0, *cuts, total)
        yield np.array([edges[i + 1] - edges[i] for i in range(parts)])


@pytest.mark.parametrize(("K", "N", "seed", "lam"), [(3, 6, 0, 0.5), (3, 8, 1, 0.3), (4, 7, 2, 0.8), (2, 9, 3, 0.5)])
def test_matching_equals_brute_force_over_every_assignment(K: int, N: int, seed: int, lam: float) -> None:
    problem = dataclasses.replace(random_problem(K, seed=seed, lam=lam, bits=(8,)), subchannels=N)
    ref = reference_costs(problem)
    uplink = problem.stage_uplink(np.zeros(K, dtype=int))
    sols, stages, eta = _solve_block(problem, uplink, ref)
    assert eta == 0.0  # no deadline: the stages are independent
    spare = stages.cap - problem.server_s - float(stages.T_min.sum())
    unit = problem.bandwidth_hz / N
    for links, relaxed, T_min in zip(stages.links, sols, stages.T_min, strict=True):
        ours, counts = match_stage(links, relaxed, N, T_min + spare)
        brute = min(solve_fixed_bandwidth(links, c * unit, T_min + spare).objective for c in compositions(N, K))
        assert ours.objective == pytest.approx(brute, rel=1e-9)
        assert counts.sum() == N and counts.min() >= 1
        assert ours.objective >= relaxed.objective * (1 - 1e-9)  # the continuous optimum is a lower bound


@pytest.mark.parametrize("seed", range(3))
def test_every_subchannel_is_used_once_and_fdma_bounds_the_objective(seed: int) -> None:
    fdma = random_problem(8, seed=seed, lam=0.5, budget_bits=6)
    ofdma = dataclasses.replace(fdma, subchannels=40)
    ours = allocate(ofdma)
    bound = allocate(fdma)
    counts = ours.stage_subchannels
    assert counts is not None and counts.dtype.kind == "i"
    for j in range(ofdma.stages):
        owner = owners(counts[:, j])
        assert owner.size == 40 and np.array_equal(np.bincount(owner, minlength=8), counts[:, j])
    assert np.allclose(ours.stage_bandwidth_hz, counts * 20e6 / 40)
    assert np.all(ours.stage_bandwidth_hz.sum(axis=0) <= 20e6 * (1 + 1e-12))
    assert ours.objective >= bound.objective * (1 - 1e-6)
    assert 0 <= ours.relaxation_gap < 0.05
    fixed = solve_power_bandwidth(ofdma, np.array([ofdma.option_index(int(q)) for q in ours.bits]))
    assert fixed.relaxation_gap is not None and fixed.relaxation_gap >= -1e-9
    # never worse than the equal whole-subchannel split at the same reference
    assert ours.objective <= equal_allocation(ofdma, 8, reference_costs(ofdma)).objective * (1 + 1e-9)


def test_more_devices_than_subchannels_is_refused() -> None:
    from sflam.platform.allocation import AllocationError

    with pytest.raises(AllocationError, match="subchannels"):
        allocate(dataclasses.replace(random_problem(6, seed=0), subchannels=4))
