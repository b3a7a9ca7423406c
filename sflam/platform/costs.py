"""What a round costs, measured on the real model: FLOPs of each part, device memory, and the round plan.

FLOPs are counted with torch's FlopCounterMode on the real split parts (per input shape, cached). The
counter does not see bitsandbytes' 4-bit matmul, so every quantized linear layer is checked during the
count: where the counter saw less than its 2·in·out multiply-adds per token, the difference is added
(a quantized layer still does the full product after dequantization; dequantization itself is a table
lookup and scale, not counted). Device memory is the measured peak of one full training step of the
device part (forward, backward with the received gradient, AdamW step): on CPU from the allocator's
memory events recorded by torch.profiler, on CUDA from torch.cuda.max_memory_allocated. The planner
turns a round's real mini-batches into the phases of the schedule the runtime executes, prices them
(exact codec payloads), runs the configured allocation policy and reports the makespan (DESIGN §6-7).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import Any

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
from sflam.platform.cache import CostCache, parts_fingerprint
from sflam.platform.config import ExperimentConfig
from sflam.platform.data import Batch
from sflam.platform.executors import server_chunks
from sflam.platform.quantization import bnb, stored_weight_bytes
from sflam.platform.schedule import (
    Phases,
    latency,
    lockstep_phases,
    lockstep_stage_compute,
    lockstep_stage_payloads,
)
from sflam.platform.system import Population, compute_energy_j, compute_latency_s, noise_w_per_hz

HEADER_BITS_PER_SAMPLE = 32  # sequence length (16) and label (16) travel with the smashed data
QUANTIZED_LINEARS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


# --------------------------------------------------------------------------- FLOPs


def _count(fn, module: torch.nn.Module | None = None) -> int:
    """FLOPs of fn() as FlopCounterMode counts them, plus the quantized matmuls it cannot see."""
    missing = [0]
    handles = []
    with FlopCounterMode(display=False) as counter:
        if module is not None:
            for sub in module.modules():
                if isinstance(sub, QUANTIZED_LINEARS):
                    handles.append(sub.register_forward_pre_hook(lambda m, a: setattr(m, "_sflam_seen",
                                                                                      counter.get_total_flops())))
                    handles.append(sub.register_forward_hook(
                        lambda m, a, out: missing.__setitem__(0, missing[0] + max(
                            0, 2 * m.in_features * m.out_features * (a[0].numel() // m.in_features)
                            - (counter.get_total_flops() - m._sflam_seen)))))
        try:
            fn()
        finally:
            for handle in handles:
                handle.remove()
    return int(counter.get_total_flops()) + missing[0]


def _sample(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample of a batch at the batch's padded shape (the compute does not depend on the values)."""
    return batch.input_ids[:1], torch.ones_like(batch.attention_mask[:1])


class FlopTable:
    """Forward and backward FLOPs per sample of the device part and the server part, by input shape."""

    def __init__(self, device_part: torch.nn.Module, server_part: torch.nn.Module, adapter: dict[str, torch.Tensor],
                 hidden_size: int, cache: CostCache | None = None) -> None:
        """`cache`: the on-disk entry of these parts (see `cost_fields`); counts found there are not redone,
        new ones are added to it."""
        self.device_part = device_part
        self.server_part = server_part
        self.adapter = adapter
        self.hidden_size = hidden_size
        self.cache = cache
        self._device: dict[tuple[int, ...], tuple[int, int]] = {}
        self._server: dict[int, tuple[int, int]] = {}
        self.cached = self._load()

    def _load(self) -> int:
        """Counts from the cache entry (a malformed one is ignored as a whole); how many were read."""
        if self.cache is None:
            return 0
        value = self.cache.load()
        try:
            device = {tuple(int(v) for v in key.split(",")): (int(f), int(b))
                      for key, (f, b) in value.get("device", {}).items()}
            server = {int(key): (int(f), int(b)) for key, (f, b) in value.get("server", {}).items()}
        except (TypeError, ValueError, AttributeError):
            return 0
        self._device.update(device)
        self._server.update(server)
        return len(device) + len(server)

    def _save(self) -> None:
        if self.cache is not None:
            self.cache.save({"device": {",".join(str(v) for v in key): list(fb) for key, fb in self._device.items()},
                             "server": {str(key): list(fb) for key, fb in self._server.items()}})

    def device_batch(self, batch: Batch) -> tuple[int, int]:
        """(forward, backward) FLOPs of one sample of `batch` (at its padded shape) through the device part."""
        inputs, mask = _sample(batch)
        key = tuple(inputs.shape[1:]) + tuple(mask.shape[1:])
        if key not in self._device:
            adapter = {n: t.detach().clone().requires_grad_(True) for n, t in self.adapter.items()}
            out: list[torch.Tensor] = []

            def forward() -> None:
                with torch.enable_grad() if adapter else torch.no_grad():
                    out.append(torch.func.functional_call(self.device_part, adapter, (inputs, mask), strict=False))

            fwd = _count(forward, self.device_part)
            bwd = _count(lambda: out[0].backward(torch.ones_like(out[0])), self.device_part) if adapter else 0
            self._device[key] = (fwd, bwd)
            self._save()
        return self._device[key]

    def device(self, length: int) -> tuple[int, int]:
        """(forward, backward) FLOPs of one token sequence of `length` through the device part."""
        ids = torch.full((1, length), 1000, dtype=torch.long)
        return self.device_batch(Batch(ids, torch.ones_like(ids), torch.zeros(1, dtype=torch.long)))

    def server(self, length: int) -> tuple[int, int]:
        """(forward, backward) FLOPs of one sample of `length` tokens through the server part."""
        if length not in self._server:
            hidden = torch.zeros((1, length, self.hidden_size), requires_grad=True)
            mask = torch.ones((1, length), dtype=torch.long)
            out: list[torch.Tensor] = []

            def forward() -> None:
                with torch.enable_grad():
                    out.append(self.server_part(hidden, mask).sum())

            fwd = _count(forward, self.server_part)
            bwd = _count(lambda: out[0].backward(), self.server_part)
            self.server_part.zero_grad(set_to_none=True)
            self._server[length] = (fwd, bwd)
            self._save()
        return self._server[length]


# --------------------------------------------------------------------------- device memory


@dataclass(frozen=True)
class DeviceMemory:
    """Peak bytes a device holds during one training step of its part, and what they are (DESIGN §6).

    `activations` is what the peak holds beyond weights, adapters, gradients and optimizer state: the
    activations kept for backward, the received gradient and the step's transient buffers (dequantized
    weights, autograd workspace), so the breakdown sums to the measured peak.
    """

    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    peak: int = 0

    @property
    def total(self) -> int:
        return max(self.peak, self.weights + self.adapters + self.gradients + self.optimizer + self.activations)


@contextlib.contextmanager
def _quiet_fd(fd: int):
    """Silence a file descriptor (kineto prints its start and stop lines from C++)."""
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _cpu_peak_bytes(fn) -> int:
    """The highest net bytes the CPU allocator held above its starting level while fn() ran."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd(1), _quiet_fd(2), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    deltas = np.array([e.nbytes() for e in events], dtype=np.int64)
    return int(np.max(np.cumsum(deltas), initial=0))


def measure_device_memory(part: torch.nn.Module, adapter: dict[str, torch.Tensor], batch: Batch,
                          lr: float = 1e-3) -> DeviceMemory:
    """Measure one full training step of `part` on `batch` as a device runs it: forward, backward with the
    received activation gradient, AdamW step (its state is created in the first step of a round)."""
    live = {n: t.detach().clone().requires_grad_(True) for n, t in adapter.items()}
    optimizer = torch.optim.AdamW(live.values(), lr=lr, weight_decay=0.0) if live else None
    inputs, mask = batch.input_ids, batch.attention_mask

    def step() -> None:
        with torch.enable_grad() if live else torch.no_grad():
            out = torch.func.functional_call(part, live, (inputs, mask), strict=False)
        if optimizer is not None:
            out.backward(torch.ones_like(out))  # the decoded gradient from the server
            optimizer.step()

    cuda = any(p.is_cuda for p in part.parameters())
    before = stored_weight_bytes(part) + sum(t.nbytes for t in live.values()) + inputs.nbytes + mask.nbytes
    if cuda:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = before + torch.cuda.max_memory_allocated() - start
    else:
        peak = before + _cpu_peak_bytes(step)
    adapters = sum(t.nbytes for t in live.values())
    gradients = sum(t.grad.nbytes for t in live.values() if t.grad is not None)
    state = 0 if optimizer is None else sum(v.nbytes for s in optimizer.state.values() for v in s.values()
                                            if isinstance(v, torch.Tensor))
    weights = stored_weight_bytes(part)
    rest = max(0, peak - weights - adapters - gradients - state)
    return DeviceMemory(weights=weights, adapters=adapters, gradients=gradients, optimizer=state,
                        activations=int(rest), peak=int(peak))


def cost_fields(config: ExperimentConfig, *parts: torch.nn.Module) -> dict[str, Any]:
    """What the FLOP table and the device memory of built parts depend on, for their cache key: the model,
    task, cut layer, weight mode, LoRA, and the parts' own structure (which covers label heads, image sizes
    and any other setting that changes a layer)."""
    m = config.model
    return {"model": m.name, "task": m.task, "image_size": m.image_size,
            "cut_layer": config.split.cut_layer, "weights": config.quant.weights,
            "lora": {"rank": config.lora.rank, "alpha": config.lora.alpha,
                     "targets": list(config.lora.target_modules), "server": config.lora.server},
            "parts": parts_fingerprint(*parts)}


def cached_device_memory(config: ExperimentConfig, part: torch.nn.Module, adapter: dict[str, torch.Tensor],
                         batch: Batch, fields: dict[str, Any]) -> DeviceMemory:
    """`measure_device_memory`, read from the cache when this step (parts, batch, threads, device) was measured
    before; a missing or malformed entry is measured and written."""
    digest = hashlib.sha256(batch.input_ids.numpy().tobytes() + batch.attention_mask.numpy().tobytes()).hexdigest()
    cuda = any(p.is_cuda for p in part.parameters())
    cache = CostCache("memory", {**fields, "batch": [list(batch.input_ids.shape), str(batch.input_ids.dtype), digest],
                                 "batch_size": config.train.batch_size, "max_length": config.model.max_length,
                                 "adapter": {n: list(t.shape) for n, t in adapter.items()},
                                 "device": torch.cuda.get_device_name() if cuda else "cpu",
                                 "threads": torch.get_num_threads()})
    value = cache.load()
    names = [f.name for f in dataclasses.fields(DeviceMemory)]
    if sorted(value) == sorted(names) and all(isinstance(value[n], int) for n in names):
        return DeviceMemory(**value)
    memory = measure_device_memory(part, adapter, batch)
    cache.save(dataclasses.asdict(memory))
    return memory


# --------------------------------------------------------------------------- the round plan


@dataclass(frozen=True)
class RoundPlan:
    """What the allocator decided for a round, the schedule it runs in, and what it costs."""

    devices: np.ndarray
    allocation: Allocation
    samples: np.ndarray
    phases: Phases
    schedule: str
    gain: np.ndarray
    solo_s: np.ndarray  # each device's own chain of phases at an equal share and full power: its speed

    @property
    def compute_s(self) -> np.ndarray:
        """Each device's own computation in the round."""
        return np.sum(self.phases.forward + self.phases.backward, axis=1)

    def metrics(self) -> dict[str, float]:
        a = self.allocation
        lat = latency(self.phases, self.schedule)
        return {
            "round_latency_s": lat.round_s,
            "comm_latency_s": lat.comm_s,
            "compute_latency_s": lat.compute_s,
            "energy_j": a.total_energy_j,
            "bits_mean": float(np.mean(a.bits)),
            "bits_min": float(np.min(a.bits)),
            "bits_max": float(np.max(a.bits)),
            "power_mean_w": float(np.mean(a.power_w)),
            "power_max_w": float(np.max(a.stage_power_w)),
            "bandwidth_min_hz": float(np.min(a.bandwidth_hz)),
            "bandwidth_max_hz": float(np.max(a.bandwidth_hz)),
            "objective": a.objective,
        }

    def table(self) -> list[dict[str, Any]]:
        """One row per device: the per-device allocation CSV (power and bandwidth averaged over the stages)."""
        a = self.allocation
        compute = self.compute_s
        rows: list[dict[str, Any]] = [{"device": int(k), "samples": int(self.samples[i]), "gain": float(self.gain[i]),
                 "bits": int(a.bits[i]), "power_w": float(a.power_w[i]), "bandwidth_hz": float(a.bandwidth_hz[i]),
                 "uplink_s": float(a.uplink_s[i].sum()), "downlink_s": float(a.downlink_s[i].sum()),
                 "compute_s": float(compute[i]), "finish_s": float(a.latency_s[i]),
                 "energy_j": float(a.energy_j[i])} for i, k in enumerate(self.devices)]
        if a.stage_subchannels is not None:  # OFDMA: whole subchannels in each stage
            for i, row in enumerate(rows):
                row["subchannels"] = " ".join(str(int(n)) for n in a.stage_subchannels[i])
        return rows


@dataclass(frozen=True)
class RoundInputs:
    """A round's per-device work, known before it starts: samples, compute phases, payloads."""

    samples: np.ndarray          # (K,)
    forward_s: np.ndarray        # (K, E)
    backward_s: np.ndarray       # (K, E)
    server_s: np.ndarray         # (E,) over the whole batch, or (K, E) per device (sequential)
    compute_energy_j: np.ndarray  # (K,)
    gain: np.ndarray             # (K,)


class RoundPlanner:
    """Builds each round's phases from the real batches, allocates and prices them under `schedule`.

    lockstep (sfl, sfl-q, sflam), sequential (sl: devices one after another, each alone on the whole band)
    or parallel (fl: the whole model on the device, only adapters travel; `flops` then counts the whole
    model as the device part).
    """

    def __init__(self, config: ExperimentConfig, flops: FlopTable, adapter_bits: int, trains_device: bool,
                 schedule: str = "lockstep") -> None:
        self.config = config
        self.flops = flops
        self.adapter_bits = adapter_bits
        self.trains_device = trains_device
        self.schedule = schedule
        self.population = Population.place(config.system, config.data.num_devices, config.seed)
        alloc = config.allocation
        self.options = np.array(sorted(set(alloc.bits) | {config.quant.activation_bits}))
        self.budget = float(distortion(alloc.distortion_bits))

    # -- the work of a round -----------------------------------------------------------------
    def inputs(self, round_index: int, devices: np.ndarray, batches: dict[int, list[Batch]]) -> RoundInputs:
        cfg, sysc = self.config, self.config.system
        K, E = len(devices), cfg.train.local_steps
        fwd_flops, bwd_flops = np.zeros((K, E)), np.zeros((K, E))
        samples = np.zeros(K, dtype=np.int64)
        per_device_server = np.zeros((K, E))
        for i, k in enumerate(devices):
            for e, batch in enumerate(batches[int(k)]):
                fwd, bwd = self.flops.device_batch(batch)
                rows = len(batch)
                fwd_flops[i, e], bwd_flops[i, e] = rows * fwd, rows * bwd
                samples[i] += rows
                if self.schedule == "sequential":
                    per_device_server[i, e] = rows * sum(self.flops.server(int(batch.attention_mask.shape[1])))
        if self.schedule == "lockstep":
            server_flops = np.zeros(E)
            for e in range(E):  # the server's step over the devices still in the round at step e, in its chunks
                present = [batches[int(k)][e] for k in devices if e < len(batches[int(k)])]
                if present:
                    lengths = torch.cat([b.attention_mask.sum(1) for b in present]).numpy()
                    server_flops[e] = sum(len(chunk) * sum(self.flops.server(int(lengths[chunk].max())))
                                          for chunk in server_chunks(lengths))
            server_s = server_flops / sysc.server_flops
        elif self.schedule == "sequential":
            server_s = per_device_server / sysc.server_flops
        else:
            server_s = np.zeros(0)
        clock = self.population.clock_hz[devices][:, None]
        return RoundInputs(samples=samples, forward_s=compute_latency_s(fwd_flops, clock, sysc),
                           backward_s=compute_latency_s(bwd_flops, clock, sysc), server_s=server_s,
                           compute_energy_j=compute_energy_j((fwd_flops + bwd_flops).sum(axis=1), clock[:, 0], sysc),
                           gain=self.population.gains(devices, cfg.seed, round_index))

    def _smashed(self, batches: dict[int, list[Batch]], devices: np.ndarray, options: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Smashed-data payloads (K, E, Q), gradient payloads (K, E) and activation elements (K,) of a round."""
        q, hidden = self.config.quant, self.flops.hidden_size
        K, E = len(devices), self.config.train.local_steps
        up, down, elements = np.zeros((K, E, len(options))), np.zeros((K, E)), np.zeros(K)
        for i, k in enumerate(devices):
            for e, batch in enumerate(batches[int(k)]):
                tokens = int(batch.attention_mask.sum())
                header = HEADER_BITS_PER_SAMPLE * len(batch)
                up[i, e] = [codec.payload_bits(tokens, hidden, int(b), q.side_dtype) + header for b in options]
                if self.trains_device:
                    down[i, e] = codec.payload_bits(tokens, hidden, q.gradient_bits, codec.GRADIENT_SIDE_DTYPE)
                elements[i] += tokens * hidden
        return up, down, elements

    def problem(self, round_index: int, devices: np.ndarray, batches: dict[int, list[Batch]],
                lam: float | None = None, inputs: RoundInputs | None = None) -> AllocationProblem:
        """The allocation problem of a lockstep (or, for fl, parallel) round over the selected devices."""
        sysc, alloc = self.config.system, self.config.allocation
        work = inputs or self.inputs(round_index, devices, batches)
        K = len(devices)
        adapter = np.full(K, float(self.adapter_bits if self.trains_device else 0))
        # a device that drops out mid-round (fewer batches than local steps) sends no adapter back
        finished = np.array([len(batches[int(k)]) == self.config.train.local_steps for k in devices])
        adapter_up = np.where(finished, adapter, 0.0)
        if self.schedule == "parallel":  # fl: one stage, the adapter down, local training, the adapter up
            up = adapter_up[:, None, None]
            down = adapter[:, None]
            raw = adapter_up[:, None]
            compute = (work.forward_s + work.backward_s).sum(axis=1)[:, None]
            options, weight, server = np.array([32]), np.full(K, 1.0 / K), 0.0
        else:
            smashed, gradients, elements = self._smashed(batches, devices, self.options)
            up, down = lockstep_stage_payloads(smashed, gradients, adapter, adapter_up)
            raw_smashed, _, _ = self._smashed(batches, devices, np.array([32]))
            raw = lockstep_stage_payloads(raw_smashed, gradients, adapter, adapter_up)[0][:, :, 0]
            compute = lockstep_stage_compute(work.forward_s, work.backward_s)
            weight = elements / elements.sum() if elements.sum() > 0 else np.full(K, 1.0 / K)
            options, server = self.options, float(np.sum(work.server_s))
        return AllocationProblem(
            gain=work.gain, uplink_bits=up, downlink_bits=down, compute_s=compute, server_s=server,
            compute_energy_j=work.compute_energy_j, bits_options=options, raw_uplink_bits=raw,
            distortion_weight=weight, distortion_budget=self.budget, bandwidth_hz=sysc.bandwidth_hz,
            max_power_w=sysc.max_power_w, server_power_w=sysc.server_power_w,
            n0=noise_w_per_hz(sysc.noise_dbm_per_hz), lam=alloc.lam if lam is None else lam,
            deadline_s=alloc.deadline_s, max_latency_factor=alloc.max_latency_factor, energy_cap_j=alloc.energy_cap_j,
            subchannels=sysc.subchannels if sysc.access == "ofdma" and self.schedule != "sequential" else None)

    def plan(self, round_index: int, devices: np.ndarray, batches: dict[int, list[Batch]]) -> RoundPlan:
        """The round's allocation and costs. A device listed with fewer batches than local steps drops out
        after them: it computes and sends only those steps and no adapter, and is priced for just that."""
        devices = np.asarray(devices)
        work = self.inputs(round_index, devices, batches)
        if self.schedule == "sequential":
            return self._sequential(round_index, devices, batches, work)
        problem = self.problem(round_index, devices, batches, inputs=work)
        if self.schedule == "parallel":
            allocation = equal_allocation(problem, 32, reference_costs(problem))
            K, E = work.forward_s.shape
            zeros = np.zeros((K, E))
            phases = Phases(adapter_down=allocation.downlink_s[:, 0], forward=work.forward_s, uplink=zeros,
                            server=np.zeros(0), downlink=zeros, backward=work.backward_s,
                            adapter_up=allocation.uplink_s[:, 0])
            solo = phases.chains()
        else:
            ref = reference_costs(problem)
            if self.config.allocation.policy == "equal":
                allocation = equal_allocation(problem, self.config.quant.activation_bits, ref)
            else:
                allocation = allocate(problem, self.config.allocation.bits_search, reference=ref)
            phases = lockstep_phases(allocation.uplink_s, allocation.downlink_s, work.forward_s, work.backward_s,
                                     work.server_s)
            # a device's speed, independent of the allocator's equalised stages: its bits at an equal share
            equal = equal_allocation(problem, allocation.bits, ref)
            solo = lockstep_phases(equal.uplink_s, equal.downlink_s, work.forward_s, work.backward_s,
                                   work.server_s).chains()
        return RoundPlan(devices, allocation, work.samples, phases, self.schedule, work.gain, solo)

    def _sequential(self, round_index: int, devices: np.ndarray, batches: dict[int, list[Batch]],
                    work: RoundInputs) -> RoundPlan:
        """sl: each device alone with the server on the whole band at full power, one after another."""
        cfg = self.config
        parts = []
        for i, k in enumerate(devices):
            one = RoundInputs(work.samples[i:i + 1], work.forward_s[i:i + 1], work.backward_s[i:i + 1],
                              work.server_s[i], work.compute_energy_j[i:i + 1], work.gain[i:i + 1])
            problem = self.problem(round_index, devices[i:i + 1], {int(k): batches[int(k)]}, inputs=one)
            parts.append(equal_allocation(problem, cfg.quant.activation_bits, reference_costs(problem)))
        up = np.concatenate([a.uplink_s for a in parts])
        down = np.concatenate([a.downlink_s for a in parts])
        phases = lockstep_phases(up, down, work.forward_s, work.backward_s, work.server_s)
        finish = np.cumsum(phases.chains())
        energy = np.concatenate([a.energy_j for a in parts])
        allocation = Allocation(
            bits=np.concatenate([a.bits for a in parts]),
            stage_power_w=np.concatenate([a.stage_power_w for a in parts]),
            stage_bandwidth_hz=np.concatenate([a.stage_bandwidth_hz for a in parts]), uplink_s=up, downlink_s=down,
            stage_s=np.sum([a.stage_s for a in parts], axis=0), latency_s=finish,
            uplink_energy_j=np.concatenate([a.uplink_energy_j for a in parts]), energy_j=energy,
            round_latency_s=float(finish[-1]), total_energy_j=float(energy.sum()), objective=float("nan"))
        return RoundPlan(devices, allocation, work.samples, phases, self.schedule, work.gain, phases.chains())
