"""Random allocation instances with real codec payloads, for tests and benchmarks of the allocator."""

from __future__ import annotations

import numpy as np

from sflam.platform import codec
from sflam.platform.allocation import AllocationProblem, distortion
from sflam.platform.schedule import lockstep_stage_compute, lockstep_stage_payloads
from sflam.platform.system import noise_w_per_hz, path_loss_db


def random_problem(K: int, seed: int = 0, lam: float = 0.5, bits: tuple[int, ...] = (2, 4, 8, 16, 32),
                   budget_bits: float = 8, hidden: int = 384, adapter_bits: int = 200_000, steps: int = 2,
                   **kwargs) -> AllocationProblem:
    """A lockstep round of K devices and `steps` local steps with docs/concepts/system-model.md defaults: placed at
    U[50, 500] m
    with Rayleigh fading, clocks U[0.5, 2] GHz, 25-200 tokens of `hidden`-wide smashed data per step,
    8-bit gradients, an adapter exchanged; the server at 100 TFLOP/s."""
    rng = np.random.default_rng(seed)
    gain = 10 ** (-path_loss_db(rng.uniform(50, 500, K)) / 10) * rng.exponential(1.0, K)
    tokens = rng.integers(25, 200, (K, steps))
    options = np.array(bits)
    smashed = np.array([[[codec.payload_bits(int(t), hidden, int(q)) for q in options] for t in row]
                        for row in tokens], dtype=np.float64)
    raw_smashed = np.array([[[codec.payload_bits(int(t), hidden, 32)] for t in row] for row in tokens],
                           dtype=np.float64)
    gradients = np.array([[codec.payload_bits(int(t), hidden, 8) for t in row] for row in tokens], dtype=np.float64)
    adapter = np.full(K, float(adapter_bits))
    up, down = lockstep_stage_payloads(smashed, gradients, adapter, adapter)
    raw, _ = lockstep_stage_payloads(raw_smashed, gradients, adapter, adapter)
    clock = rng.uniform(0.5e9, 2e9, K)
    forward_flops, backward_flops = tokens * 1e7, tokens * 2e7
    compute = lockstep_stage_compute(forward_flops / (16 * clock[:, None]), backward_flops / (16 * clock[:, None]))
    server_s = float(tokens.sum() * 3e8 / 100e12)
    energy = 1e-28 * (forward_flops + backward_flops).sum(axis=1) / 16 * clock**2
    return AllocationProblem(
        gain=gain, uplink_bits=up, downlink_bits=down, compute_s=compute, server_s=server_s,
        compute_energy_j=energy, bits_options=options, raw_uplink_bits=raw[:, :, 0],
        distortion_weight=tokens.sum(axis=1) / tokens.sum(), distortion_budget=float(distortion(budget_bits)),
        bandwidth_hz=20e6, max_power_w=0.2, server_power_w=1.0, n0=noise_w_per_hz(-174.0), lam=lam, **kwargs)
