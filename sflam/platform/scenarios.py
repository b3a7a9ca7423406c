"""Random allocation instances with real codec payloads, for tests and benchmarks of the allocator."""

from __future__ import annotations

import numpy as np

from sflam.platform import codec
from sflam.platform.allocation import AllocationProblem, distortion
from sflam.platform.system import noise_w_per_hz, path_loss_db


def random_problem(K: int, seed: int = 0, lam: float = 0.5, bits: tuple[int, ...] = (2, 4, 8, 16, 32),
                   budget_bits: int = 8, hidden: int = 384, adapter_bits: int = 200_000, **kwargs
                   ) -> AllocationProblem:
    """A round of K devices with DESIGN §6 defaults: placed at U[50, 500] m with Rayleigh fading, clocks
    U[0.5, 2] GHz, 50-400 tokens of `hidden`-wide smashed data each, 8-bit gradients, an adapter exchanged."""
    rng = np.random.default_rng(seed)
    gain = 10 ** (-path_loss_db(rng.uniform(50, 500, K)) / 10) * rng.exponential(1.0, K)
    tokens = rng.integers(50, 400, K)
    options = np.array(bits)
    uplink = np.array([[codec.payload_bits(int(t), hidden, int(q)) for q in options] for t in tokens]) + adapter_bits
    raw = np.array([codec.payload_bits(int(t), hidden, 32) for t in tokens]) + adapter_bits
    downlink = np.array([codec.payload_bits(int(t), hidden, 8) for t in tokens]) + adapter_bits
    clock = rng.uniform(0.5e9, 2e9, K)
    flops = tokens * 3e7
    return AllocationProblem(
        gain=gain, uplink_bits=uplink.astype(float), downlink_bits=downlink.astype(float),
        fixed_latency_s=flops / (16 * clock) + 2e-3, compute_energy_j=1e-28 * flops / 16 * clock**2,
        bits_options=options, raw_uplink_bits=raw.astype(float), distortion_weight=tokens / tokens.sum(),
        distortion_budget=float(distortion(budget_bits)), bandwidth_hz=20e6, max_power_w=0.2, server_power_w=1.0,
        n0=noise_w_per_hz(-174.0), lam=lam, **kwargs)
