"""DP accounting against independent computations: closed-form RDP of the Gaussian mechanism and the analytic
Gaussian mechanism's exact ε; the releases bound against a replay of the devices' mini-batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from sflam.platform.data import device_batches
from sflam.privacy.accounting import epsilon, guarantee, noise_multiplier, releases_per_round, worst_case_releases

CASES = [(1.0, 1, 1e-5), (2.0, 8, 1e-5), (4.0, 60, 1e-6), (8.0, 200, 1e-5), (0.5, 3, 1e-3)]


def rdp_epsilon(z: float, releases: int, delta: float) -> float:
    """T Gaussian mechanisms of multiplier z: RDP α T / (2 z²) (Mironov 2017), converted with Balle et al. 2020
    (Prop. 3 / Canonne et al.), minimised over a fine grid of orders α > 1."""
    alphas = np.concatenate([1 + np.logspace(-4, 0, 4000), np.linspace(2, 2000, 200000)])
    rdp = alphas * releases / (2 * z * z)
    eps = rdp + np.log1p(-1 / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1)
    return float(eps.min())


def exact_epsilon(z: float, releases: int, delta: float) -> float:
    """The exact ε of T Gaussian mechanisms of multiplier z: one Gaussian of multiplier z / sqrt(T), whose
    δ(ε) = Φ(-εs + 1/(2s)) - e^ε Φ(-εs - 1/(2s)), s = z / sqrt(T) (Balle & Wang 2018, Theorem 8)."""
    s = z / math.sqrt(releases)

    def excess(eps: float) -> float:
        return norm.cdf(-eps * s + 1 / (2 * s)) - math.exp(eps + norm.logcdf(-eps * s - 1 / (2 * s))) - delta

    return float(brentq(excess, 1e-9, 1e3, xtol=1e-12))


def test_the_noise_multiplier_is_half_sigma() -> None:
    # replace-one: clipped messages of two inputs differ by at most 2C; noise sigma*C -> multiplier sigma/2
    assert noise_multiplier(3.0) == 1.5


@pytest.mark.parametrize(("sigma", "releases", "delta"), CASES)
def test_rdp_epsilon_matches_the_closed_form_and_bounds_the_exact_one(sigma: float, releases: int, delta: float
                                                                      ) -> None:
    z = sigma / 2
    ours = epsilon(sigma, releases, delta)
    closed = rdp_epsilon(z, releases, delta)
    exact = exact_epsilon(z, releases, delta)
    # Opacus minimises over its own orders: never below the continuous optimum, and close to it
    assert closed <= ours * (1 + 1e-9)
    assert ours == pytest.approx(closed, rel=2e-3)
    # RDP is an upper bound of the exact ε of the composed Gaussian mechanisms
    assert exact <= ours
    assert ours <= 1.15 * exact


@pytest.mark.parametrize(("sigma", "releases", "delta"), CASES[:3])
def test_prv_epsilon_is_close_to_the_exact_one(sigma: float, releases: int, delta: float) -> None:
    exact = exact_epsilon(sigma / 2, releases, delta)
    assert epsilon(sigma, releases, delta, accountant="prv") == pytest.approx(exact, rel=5e-3)


def test_epsilon_grows_with_releases_and_falls_with_noise() -> None:
    assert epsilon(2.0, 10, 1e-5) < epsilon(2.0, 20, 1e-5)
    assert epsilon(4.0, 10, 1e-5) < epsilon(2.0, 10, 1e-5)
    assert epsilon(0.0, 10, 1e-5) == math.inf
    assert guarantee(0.0, 1.0, 10, 1e-5) is None and guarantee(1.0, 0.0, 10, 1e-5) is None
    g = guarantee(2.0, 5.0, 10, 1e-5)
    assert g is not None and g.noise_multiplier == 1.0 and g.epsilon == epsilon(2.0, 10, 1e-5)
    assert "labels" in g.statement and "2C" in g.statement


@pytest.mark.parametrize(("batch_size", "local_steps", "sizes"), [
    (8, 2, (1, 3, 7, 8, 9, 16, 33)), (4, 5, (1, 3, 7, 8, 9, 16, 33)), (16, 3, (1, 3, 7, 8, 9, 16, 33)),
    (8, 2, (9, 11, 13, 20, 33)), (4, 5, (9, 11, 13, 20, 33))])  # shards of at least a batch: E*b/n is no integer
def test_releases_bound_the_replayed_draws_and_are_reached(batch_size: int, local_steps: int,
                                                           sizes: tuple[int, ...]) -> None:
    sizes = np.array(sizes)
    per_round = releases_per_round(sizes, batch_size, local_steps)
    most = 0
    for device, size in enumerate(sizes):
        shard = np.arange(size) + 1000 * device
        for round_index in range(20):
            drawn = np.concatenate(device_batches(shard, batch_size, local_steps, 7, round_index, device))
            most = max(most, int(np.bincount(drawn - 1000 * device).max()))
    assert most == per_round
    assert worst_case_releases(sizes, batch_size, local_steps, rounds=30) == 30 * per_round
