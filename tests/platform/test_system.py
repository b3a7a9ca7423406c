"""The channel and compute model (docs/concepts/system-model.md): constants, formulas, reproducible fading."""

from __future__ import annotations

import numpy as np
import pytest

from sflam.platform.config import SystemConfig
from sflam.platform.system import (
    Population,
    compute_energy_j,
    compute_latency_s,
    energy_per_bit_floor,
    noise_w_per_hz,
    path_loss_db,
    shannon_rate,
)


def test_constants_and_path_loss() -> None:
    assert noise_w_per_hz(-174.0) == pytest.approx(3.981e-21, rel=1e-3)
    assert path_loss_db(np.array([1000.0]))[0] == pytest.approx(128.1)
    assert path_loss_db(np.array([100.0]))[0] == pytest.approx(128.1 - 37.6)


def test_shannon_rate_and_its_limits() -> None:
    n0, g = noise_w_per_hz(-174.0), 1e-11
    b, p = 1e6, 0.1
    assert shannon_rate(b, p, np.array([g]), n0)[0] == pytest.approx(b * np.log2(1 + p * g / (n0 * b)))
    # infinite bandwidth: p g / (N0 ln 2)
    assert shannon_rate(1e15, p, np.array([g]), n0)[0] == pytest.approx(p * g / (n0 * np.log(2)), rel=1e-6)
    assert shannon_rate(0.0, p, np.array([g]), n0)[0] == 0.0
    assert energy_per_bit_floor(np.array([g]), n0)[0] == pytest.approx(n0 * np.log(2) / g)


def test_population_is_reproducible_and_within_ranges() -> None:
    cfg = SystemConfig()
    one, two = Population.place(cfg, 500, seed=3), Population.place(cfg, 500, seed=3)
    assert np.array_equal(one.distance_m, two.distance_m) and np.array_equal(one.clock_hz, two.clock_hz)
    assert one.distance_m.min() >= 50 and one.distance_m.max() <= 500
    assert one.clock_hz.min() >= 0.5e9 and one.clock_hz.max() <= 2e9
    assert not np.array_equal(one.distance_m, Population.place(cfg, 500, seed=4).distance_m)


def test_rayleigh_fading_is_redrawn_each_round_with_unit_mean() -> None:
    cfg = SystemConfig(min_distance_m=100.0, max_distance_m=100.0)
    population = Population.place(cfg, 2000, seed=0)
    devices = np.arange(2000)
    mean_gain = 10 ** (-path_loss_db(np.array([100.0]))[0] / 10)
    first, second = population.gains(devices, 0, 0), population.gains(devices, 0, 1)
    assert not np.allclose(first, second, rtol=1e-3, atol=0.0)
    fading = first / mean_gain
    assert fading.mean() == pytest.approx(1.0, abs=0.08)  # Exp(1)
    assert np.var(fading) == pytest.approx(1.0, abs=0.2)
    # a device's fading does not depend on who else is selected
    assert population.gains(np.array([5, 9]), 0, 0)[1] == first[9]


def test_shadowing_spreads_the_gains() -> None:
    plain = Population.place(SystemConfig(), 1000, seed=0)
    shadowed = Population.place(SystemConfig(shadowing_db=8.0), 1000, seed=0)
    assert np.std(shadowed.shadowing_db) == pytest.approx(8.0, rel=0.1) and not plain.shadowing_db.any()


def test_compute_latency_and_energy() -> None:
    cfg = SystemConfig()
    flops, clock = np.array([1.6e10]), np.array([1e9])
    assert compute_latency_s(flops, clock, cfg)[0] == pytest.approx(1.0)  # 1.6e10 / (16 x 1e9)
    assert compute_energy_j(flops, clock, cfg)[0] == pytest.approx(1e-28 * 1e9 * 1e18)
