"""Device memory: the measured peak of one full training step of a device part, with its breakdown.

The step is the device's own: forward, backward with the received activation gradient, AdamW step. On CPU the
peak comes from the allocator's memory events recorded by torch.profiler (so it includes what bitsandbytes
allocates outside autograd: dequantized weights and its buffers), on CUDA from torch.cuda.max_memory_allocated.
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

from sflam.platform.cache import CostCache
from sflam.platform.config import ExperimentConfig
from sflam.platform.data import Batch
from sflam.platform.quantization import stored_weight_bytes


@dataclass(frozen=True, kw_only=True)
class DeviceMemory:
    """Peak bytes a device holds during one training step of its part, and what they are
    (docs/concepts/system-model.md).

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
                          lr: float = 1e-3, head: Any = None) -> DeviceMemory:
    """Measure one full training step of `part` on `batch` as a device runs it: forward, backward with the
    received activation gradient, AdamW step (its state is created in the first step of a round). A U-shaped
    split's `head` (a HeadPart, its tensors named "top." in `adapter`) runs on the received features between the
    forward and the backward, with the forward's graph kept, as on the device."""
    live = {n: t.detach().clone().requires_grad_(True) for n, t in adapter.items()}
    optimizer = torch.optim.AdamW(live.values(), lr=lr, weight_decay=0.0) if live else None
    inputs, mask = batch.input_ids, batch.attention_mask
    bottom = {n: t for n, t in live.items() if not n.startswith("top.")}
    top = {n[len("top."):]: t for n, t in live.items() if n.startswith("top.")}

    def step() -> None:
        with torch.enable_grad() if bottom else torch.no_grad():
            out = torch.func.functional_call(part, bottom, (inputs, mask), strict=False)
        if head is not None:
            features = torch.zeros((len(batch), head.width), requires_grad=True)  # decoded from the server
            with torch.enable_grad():
                torch.func.functional_call(head, top, (features,), strict=False).sum().backward()
        if bottom and out.requires_grad:
            out.backward(torch.ones_like(out))  # the decoded gradient from the server
        if optimizer is not None:
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


def cached_device_memory(config: ExperimentConfig, part: torch.nn.Module, adapter: dict[str, torch.Tensor],
                         batch: Batch, fields: dict[str, Any], head: Any = None) -> DeviceMemory:
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
    memory = measure_device_memory(part, adapter, batch, head=head)
    cache.save(dataclasses.asdict(memory))
    return memory
