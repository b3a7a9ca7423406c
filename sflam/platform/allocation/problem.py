"""The allocation problem of one round and its solution: what the allocator is given and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sflam.platform.errors import SflamError

MAX_X = 1000.0  # spectral efficiency cap (bit/s/Hz) that keeps 2^x finite


class AllocationError(SflamError):
    """No allocation satisfies the constraints (deadline, energy caps, bandwidth)."""


def distortion(bits: np.ndarray | float) -> np.ndarray:
    """The codec's per-element variance bound relative to the row range squared: Δ²/4 / range² (0 at 32 bits).

    Δ = range / (2^q - 1) is the codec's actual step (its side information never widens it,
    docs/concepts/split-and-codec.md).
    """
    q = np.asarray(bits, dtype=np.float64)
    return np.where(q >= 32, 0.0, 1.0 / (4.0 * (2.0 ** np.minimum(q, 31) - 1.0) ** 2))


@dataclass(frozen=True, kw_only=True)
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


@dataclass(frozen=True, kw_only=True)
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
