"""The wireless channel and the device/server compute model of docs/concepts/system-model.md: pure numpy, vectorised
over devices.

Uplink FDMA: device k gets bandwidth b_k of the total B and transmits at power p_k <= P_max; its rate is
Shannon's r_k = b_k log2(1 + p_k g_k / (N0 b_k)). Gain g_k = 10^(-PL/10) |h|^2 (x shadowing), with the
3GPP macro-cell path loss PL = 128.1 + 37.6 log10(d_km) dB and Rayleigh block fading |h|^2 ~ Exp(1)
redrawn every round. The downlink uses the same share at the server's power P_s.
Computation: latency = FLOPs / (phi f_k), energy = kappa (FLOPs / phi) f_k^2 (the CMOS model
E = kappa * cycles * f^2 of Mao et al., "A survey on mobile edge computing", 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sflam.platform.config import SystemConfig

LN2 = float(np.log(2.0))


def noise_w_per_hz(dbm_per_hz: float) -> float:
    """N0 in W/Hz from dBm/Hz (-174 dBm/Hz -> 3.98e-21 W/Hz)."""
    return float(10.0 ** ((dbm_per_hz - 30.0) / 10.0))


def path_loss_db(distance_m: np.ndarray) -> np.ndarray:
    """3GPP TR 36.814 macro-cell path loss at distance d (metres)."""
    return 128.1 + 37.6 * np.log10(np.asarray(distance_m, dtype=np.float64) / 1000.0)


def shannon_rate(bandwidth_hz: np.ndarray | float, power_w: np.ndarray | float, gain: np.ndarray,
                 n0: float) -> np.ndarray:
    """Bits per second of an FDMA share; 0 where the share or the power is 0."""
    b = np.asarray(bandwidth_hz, dtype=np.float64)
    p = np.asarray(power_w, dtype=np.float64)
    safe_b = np.where(b > 0, b, 1.0)
    rate = safe_b * np.log2(1.0 + p * gain / (n0 * safe_b))
    return np.where((b > 0) & (p > 0), rate, 0.0)


@dataclass(frozen=True)
class Population:
    """The static part of every device: distance to the base station, shadowing and CPU clock."""

    distance_m: np.ndarray
    shadowing_db: np.ndarray
    clock_hz: np.ndarray

    @classmethod
    def place(cls, cfg: SystemConfig, num_devices: int, seed: int) -> Population:
        rng = np.random.default_rng([seed, 0x5F1A, 1])
        distance = rng.uniform(cfg.min_distance_m, cfg.max_distance_m, size=num_devices)
        shadowing = rng.normal(0.0, cfg.shadowing_db, size=num_devices) if cfg.shadowing_db > 0 else \
            np.zeros(num_devices)
        clock = rng.uniform(cfg.min_clock_hz, cfg.max_clock_hz, size=num_devices)
        return cls(distance, shadowing, clock)

    def gains(self, devices: np.ndarray, seed: int, round_index: int) -> np.ndarray:
        """Channel power gains of `devices` in a round: path loss, shadowing and Rayleigh fading |h|^2 ~ Exp(1).

        The fading of device k in round r depends on (seed, r, k) alone, whoever else is selected.
        """
        devices = np.asarray(devices, dtype=np.int64)
        fading = np.array([np.random.default_rng([seed, 0x5F1A, 2, round_index, int(k)]).exponential(1.0)
                           for k in devices])
        loss_db = path_loss_db(self.distance_m[devices]) - self.shadowing_db[devices]
        return 10.0 ** (-loss_db / 10.0) * fading


def compute_latency_s(flops: np.ndarray, clock_hz: np.ndarray, cfg: SystemConfig) -> np.ndarray:
    return np.asarray(flops, dtype=np.float64) / (cfg.flops_per_cycle * np.asarray(clock_hz))


def compute_energy_j(flops: np.ndarray, clock_hz: np.ndarray, cfg: SystemConfig) -> np.ndarray:
    cycles = np.asarray(flops, dtype=np.float64) / cfg.flops_per_cycle
    return cfg.kappa * cycles * np.asarray(clock_hz) ** 2


def energy_per_bit_floor(gain: np.ndarray, n0: float) -> np.ndarray:
    """The least uplink energy per bit at any bandwidth and time: N0 ln2 / g (infinite time)."""
    return n0 * LN2 / np.asarray(gain)


def latency_floor_s(bits: np.ndarray, gain: np.ndarray, cfg: SystemConfig) -> np.ndarray:
    """The least uplink time of a payload: the whole band at full power."""
    n0 = noise_w_per_hz(cfg.noise_dbm_per_hz)
    return np.asarray(bits, dtype=np.float64) / shannon_rate(cfg.bandwidth_hz, cfg.max_power_w, gain, n0)
