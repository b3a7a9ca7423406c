"""What a round costs, measured on the real model: FLOPs of each part, device memory, and the round plan.

FLOPs are counted with torch's FlopCounterMode on the real split parts (per padded sequence length,
cached), never guessed; device memory is the bytes of the device part's weights as stored, its
adapters, their gradients and AdamW state, and the activations one local step keeps for backward,
measured with autograd's saved-tensor hooks. The planner turns a round's real mini-batches into an
AllocationProblem (exact codec payloads), runs the configured policy and prices the result (DESIGN §6-7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from sflam.platform import codec
from sflam.platform.allocation import (
    Allocation,
    AllocationProblem,
    allocate,
    distortion,
    equal_allocation,
    reference_costs,
)
from sflam.platform.config import ExperimentConfig
from sflam.platform.data import Batch
from sflam.platform.quantization import stored_weight_bytes
from sflam.platform.system import Population, compute_energy_j, compute_latency_s, noise_w_per_hz

HEADER_BITS_PER_SAMPLE = 32  # sequence length (16) and label (16) travel with the smashed data


# --------------------------------------------------------------------------- FLOPs


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class FlopTable:
    """Forward and backward FLOPs per sample of the device part and the server part, by sequence length."""

    def __init__(self, device_part: torch.nn.Module, server_part: torch.nn.Module, adapter: dict[str, torch.Tensor],
                 hidden_size: int) -> None:
        self.device_part = device_part
        self.server_part = server_part
        self.adapter = adapter
        self.hidden_size = hidden_size
        self._device: dict[int, tuple[int, int]] = {}
        self._server: dict[int, tuple[int, int]] = {}

    def device(self, length: int) -> tuple[int, int]:
        """(forward, backward) FLOPs of one sample of `length` tokens through the device part."""
        if length not in self._device:
            ids = torch.full((1, length), 1000, dtype=torch.long)
            mask = torch.ones_like(ids)
            adapter = {n: t.detach().clone().requires_grad_(True) for n, t in self.adapter.items()}
            out: list[torch.Tensor] = []

            def forward() -> None:
                with torch.enable_grad() if adapter else torch.no_grad():
                    out.append(torch.func.functional_call(self.device_part, adapter, (ids, mask), strict=False))

            fwd = _count(forward)
            bwd = _count(lambda: out[0].backward(torch.ones_like(out[0]))) if adapter else 0
            self._device[length] = (fwd, bwd)
        return self._device[length]

    def server(self, length: int) -> tuple[int, int]:
        """(forward, backward) FLOPs of one sample of `length` tokens through the server part."""
        if length not in self._server:
            hidden = torch.zeros((1, length, self.hidden_size), requires_grad=True)
            mask = torch.ones((1, length), dtype=torch.long)
            out: list[torch.Tensor] = []

            def forward() -> None:
                with torch.enable_grad():
                    out.append(self.server_part(hidden, mask).sum())

            fwd = _count(forward)
            bwd = _count(lambda: out[0].backward())
            self.server_part.zero_grad(set_to_none=True)
            self._server[length] = (fwd, bwd)
        return self._server[length]


# --------------------------------------------------------------------------- device memory


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes a device holds to train its part (DESIGN §6)."""

    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.gradients + self.optimizer + self.activations


def measure_device_memory(part: torch.nn.Module, adapter: dict[str, torch.Tensor], batch: Batch) -> DeviceMemory:
    """Weights as stored + adapters (fp32) + gradients + AdamW's two moments + the activations one step
    keeps for backward (tensors saved by autograd, excluding the weights themselves) and its output."""
    params = {p.data_ptr() for p in part.parameters()}
    adapter_bytes = sum(t.numel() * 4 for t in adapter.values())
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in params:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    live = {n: t.detach().clone().requires_grad_(True) for n, t in adapter.items()}
    with torch.enable_grad() if live else torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = torch.func.functional_call(part, live, (batch.input_ids, batch.attention_mask), strict=False)
    activations = sum(seen.values()) + out.numel() * out.element_size()
    return DeviceMemory(weights=stored_weight_bytes(part), adapters=adapter_bytes, gradients=adapter_bytes,
                        optimizer=2 * adapter_bytes, activations=int(activations))


# --------------------------------------------------------------------------- the round plan


@dataclass(frozen=True)
class RoundPlan:
    """What the allocator decided for a round, and what it costs."""

    devices: np.ndarray
    allocation: Allocation
    samples: np.ndarray
    compute_s: np.ndarray
    server_s: float

    def metrics(self) -> dict[str, float]:
        a = self.allocation
        return {
            "round_latency_s": a.round_latency_s,
            "comm_latency_s": float(np.max(a.comm_latency_s)),  # the longest uplink + downlink of any device
            "compute_latency_s": float(np.max(self.compute_s) + self.server_s),
            "energy_j": a.total_energy_j,
            "bits_mean": float(np.mean(a.bits)),
            "bits_min": float(np.min(a.bits)),
            "bits_max": float(np.max(a.bits)),
            "power_mean_w": float(np.mean(a.power_w)),
            "power_max_w": float(np.max(a.power_w)),
            "bandwidth_min_hz": float(np.min(a.bandwidth_hz)),
            "bandwidth_max_hz": float(np.max(a.bandwidth_hz)),
            "objective": a.objective,
        }

    def table(self) -> list[dict[str, float]]:
        """One row per device: the per-device allocation CSV."""
        a = self.allocation
        return [{"device": int(k), "samples": int(self.samples[i]), "bits": int(a.bits[i]),
                 "power_w": float(a.power_w[i]), "bandwidth_hz": float(a.bandwidth_hz[i]),
                 "uplink_s": float(a.uplink_s[i]), "downlink_s": float(a.downlink_s[i]),
                 "compute_s": float(self.compute_s[i]), "latency_s": float(a.latency_s[i]),
                 "energy_j": float(a.energy_j[i])} for i, k in enumerate(self.devices)]


class RoundPlanner:
    """Builds each round's allocation problem from the real batches and runs the configured policy."""

    def __init__(self, config: ExperimentConfig, flops: FlopTable, adapter_bits: int, trains_device: bool) -> None:
        self.config = config
        self.flops = flops
        self.adapter_bits = adapter_bits
        self.trains_device = trains_device
        self.population = Population.place(config.system, config.data.num_devices, config.seed)
        alloc = config.allocation
        self.options = np.array(sorted(set(alloc.bits) | ({config.quant.activation_bits}
                                                            if alloc.policy == "equal" else set())))
        budget_bits = alloc.distortion_bits if alloc.distortion_bits is not None else config.quant.activation_bits
        self.budget = float(distortion(budget_bits))

    def problem(self, round_index: int, devices: np.ndarray, batches: dict[int, list[Batch]],
                lam: float | None = None) -> tuple[AllocationProblem, np.ndarray, np.ndarray, float]:
        cfg, sysc = self.config, self.config.system
        q = cfg.quant
        hidden = self.flops.hidden_size
        K = len(devices)
        uplink = np.zeros((K, len(self.options)))
        raw = np.zeros(K)
        downlink = np.zeros(K)
        device_flops = np.zeros(K)
        samples = np.zeros(K, dtype=np.int64)
        elements = np.zeros(K)
        steps = cfg.train.local_steps
        server_flops = 0.0
        for i, k in enumerate(devices):
            for batch in batches[int(k)]:
                tokens = int(batch.attention_mask.sum())
                rows, length = batch.input_ids.shape
                header = HEADER_BITS_PER_SAMPLE * rows
                uplink[i] += [codec.payload_bits(tokens, hidden, int(b), q.side_dtype) + header for b in self.options]
                raw[i] += codec.payload_bits(tokens, hidden, 32) + header
                if self.trains_device:
                    downlink[i] += codec.payload_bits(tokens, hidden, q.gradient_bits, q.side_dtype)
                fwd, bwd = self.flops.device(int(length))
                device_flops[i] += rows * (fwd + bwd)
                samples[i] += rows
                elements[i] += tokens * hidden
        for step in range(steps):
            length = max(int(batches[int(k)][step].input_ids.shape[1]) for k in devices)
            rows = sum(int(batches[int(k)][step].input_ids.shape[0]) for k in devices)
            fwd, bwd = self.flops.server(length)
            server_flops += rows * (fwd + bwd)
        if self.trains_device:  # the global adapter comes down and the trained one goes up
            uplink += self.adapter_bits
            raw += self.adapter_bits
            downlink += self.adapter_bits
        clock = self.population.clock_hz[devices]
        compute_s = compute_latency_s(device_flops, clock, sysc)
        server_s = server_flops / sysc.server_flops
        alloc = cfg.allocation
        problem = AllocationProblem(
            gain=self.population.gains(devices, cfg.seed, round_index), uplink_bits=uplink, downlink_bits=downlink,
            fixed_latency_s=compute_s + server_s, compute_energy_j=compute_energy_j(device_flops, clock, sysc),
            bits_options=self.options, raw_uplink_bits=raw, distortion_weight=elements / elements.sum(),
            distortion_budget=self.budget, bandwidth_hz=sysc.bandwidth_hz, max_power_w=sysc.max_power_w,
            server_power_w=sysc.server_power_w, n0=noise_w_per_hz(sysc.noise_dbm_per_hz),
            lam=alloc.lam if lam is None else lam, deadline_s=alloc.deadline_s,
            max_latency_factor=alloc.max_latency_factor, energy_cap_j=alloc.energy_cap_j)
        return problem, samples, compute_s, server_s

    def plan(self, round_index: int, devices: np.ndarray, batches: dict[int, list[Batch]]) -> RoundPlan:
        problem, samples, compute_s, server_s = self.problem(round_index, devices, batches)
        if self.config.allocation.policy == "equal":
            allocation = equal_allocation(problem, self.config.quant.activation_bits, reference_costs(problem))
        else:
            allocation = allocate(problem, self.config.allocation.bits_search)
        return RoundPlan(np.asarray(devices), allocation, samples, compute_s, server_s)
