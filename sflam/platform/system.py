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

from sflam.platform.config import DeviceClass, DevicesConfig, SystemConfig

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


def class_counts(shares: list[float], num_devices: int) -> np.ndarray:
    """Devices per class: the exact proportional counts, rounded by largest remainder (ties to the earlier class),
    so they sum to `num_devices` and each differs from share * N by less than one."""
    quota = np.asarray(shares, dtype=np.float64) * num_devices
    counts = np.floor(quota).astype(np.int64)
    left = num_devices - int(counts.sum())
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[:left]] += 1
    return counts


def draw_classes(shares: list[float], num_devices: int, seed: int) -> np.ndarray:
    """Each device's class (an index into `shares`): the exact counts of `class_counts` in a seeded random order,
    fixed by the seed alone (not by rounds, selection or method)."""
    labels = np.repeat(np.arange(len(shares)), class_counts(shares, num_devices))
    return np.random.default_rng([seed, 0x5F1A, 3]).permutation(labels)


@dataclass(frozen=True)
class Population:
    """The static part of every device: its class, distance to the base station, shadowing and CPU clock.

    `device_class` indexes `classes` (all zeros and `classes` empty for a homogeneous population)."""

    distance_m: np.ndarray
    shadowing_db: np.ndarray
    clock_hz: np.ndarray
    device_class: np.ndarray | None = None
    classes: tuple[DeviceClass, ...] = ()

    @classmethod
    def place(cls, cfg: SystemConfig, num_devices: int, seed: int, devices: DevicesConfig | None = None
              ) -> Population:
        """Draw every device once per seed: its class (`draw_classes`), then distance, shadowing and clock, each
        from its class's range (or the system section's), in one stream whose draws do not depend on the classes."""
        classes = tuple(devices.classes) if devices is not None else ()
        index = draw_classes([c.share for c in classes], num_devices, seed) if classes else \
            np.zeros(num_devices, dtype=np.int64)

        def per_device(own: list[float | None], default: float) -> np.ndarray:
            """A class parameter for every device (the system section's value where the class has none)."""
            values = np.array([default if v is None else v for v in own] or [default], dtype=np.float64)
            return values[index]

        near = per_device([c.distance_m[0] if c.distance_m else None for c in classes], cfg.min_distance_m)
        far = per_device([c.distance_m[1] if c.distance_m else None for c in classes], cfg.max_distance_m)
        spread = per_device([c.shadowing_db for c in classes], cfg.shadowing_db)
        slow = per_device([c.clock_hz[0] for c in classes], cfg.min_clock_hz)
        fast = per_device([c.clock_hz[1] for c in classes], cfg.max_clock_hz)
        rng = np.random.default_rng([seed, 0x5F1A, 1])
        distance = rng.uniform(near, far, size=num_devices)
        shadowing = rng.normal(0.0, spread, size=num_devices) if np.any(spread > 0) else np.zeros(num_devices)
        clock = rng.uniform(slow, fast, size=num_devices)
        return cls(distance, shadowing, clock, index if classes else None, classes)

    def class_names(self, devices: np.ndarray) -> list[str]:
        """The class of each of `devices` (empty for a homogeneous population)."""
        if self.device_class is None:
            return []
        return [self.classes[int(c)].name for c in self.device_class[np.asarray(devices, dtype=np.int64)]]

    def class_counts(self) -> dict[str, int]:
        """Devices per class, in the classes' order (empty for a homogeneous population)."""
        if self.device_class is None:
            return {}
        counts = np.bincount(self.device_class, minlength=len(self.classes))
        return {c.name: int(n) for c, n in zip(self.classes, counts, strict=True)}

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
