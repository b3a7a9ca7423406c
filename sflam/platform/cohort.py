"""Many virtual devices as one batched computation per local step.

All devices a process holds share the device part's frozen (possibly quantized) base weights; only their
LoRA adapters differ. A cohort keeps every device's adapter stacked, (devices, ...) per tensor, and runs a
local step for all live devices at once: the base layers over the stacked batch (the mini-batches of
devices of one sequence length stacked, in chunks; rows grouped by device), each LoRA layer's delta as
batched matmuls over a (devices, rows, in) view (the multi-adapter technique of S-LoRA and Punica), and one
multi-tensor AdamW step over the stacked adapters, elementwise the same update as one AdamW per device.
With many samples the backward recomputes each chunk's forward instead of keeping its graph (bounded memory). What
each device sends and receives is encoded with its own seeded stream, so every message, adapter and loss
equals each device run alone through peft's own LoRA layers (the reference in tests/reference.py) within float
rounding. Devices of different LoRA ranks (lora.rank_policy=by-class) share the computation at the global rank:
each device's factors are exact zeros beyond its own rank and its delta is scaled by alpha / its rank (`start`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from sflam.platform import codec
from sflam.platform.codec import Encoded
from sflam.platform.data import Batch
from sflam.platform.split import block_of
from sflam.platform.strategies import Adapter, local_step, rank_dim
from sflam.privacy.defences import clip_packed, nopeek_loss

LORA = "default"  # the adapter name peft's inject_adapter_in_model gives
CHUNK_SAMPLES = 2048  # samples per stacked device-part batch
KEEP_GRAPH_SAMPLES = 8192  # up to this many samples per step the forward keeps its graph, above it recomputes


@dataclass
class Layout:
    """Where each live device's samples sit in the stacked batch, and its padded (devices, rows) view."""

    live: torch.Tensor            # positions in the cohort of the devices in this step, in order
    samples: list[int]            # samples per live device
    index: torch.Tensor | None    # row of each stacked sample in the (devices * most samples) view; None: uniform
    cut: int | None = None        # the devices' cut (all of a chunk's devices sit at one; None: the part's own)

    @property
    def most(self) -> int:
        return max(self.samples)

    def to_devices(self, x: torch.Tensor) -> torch.Tensor:
        """(samples, ..., in) grouped by device -> (devices, most samples * ..., in); padded rows are zeros."""
        if self.index is not None:
            x = x.new_zeros((len(self.samples) * self.most, *x.shape[1:])).index_copy(0, self.index, x)
        return x.reshape(len(self.samples), -1, x.shape[-1])

    def from_devices(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_devices` for a result of `like`'s leading shape."""
        y = y.reshape(len(self.samples) * self.most, *like.shape[1:-1], y.shape[-1])
        return y if self.index is None else y.index_select(0, self.index)


Chunk = tuple[list[int], torch.Tensor, torch.Tensor, Layout]  # live devices (by order), ids, mask, layout


@dataclass
class Cohort:
    """The devices a process holds in a round: stacked adapters, one optimizer over them, pending graphs."""

    devices: list[int]
    adapter: Adapter                     # name -> (devices, ...) trained tensor, or the shared global one if frozen
    optimizer: torch.optim.Optimizer | None
    anchor: Adapter | None = None        # the global adapter, for FedProx's proximal term
    proximal_mu: float = 0.0
    samples_trained: int = 0
    pending: dict[int, list[tuple[Chunk, torch.Tensor | None]]] = field(default_factory=dict)  # graph if kept
    clip_norm: float = 0.0               # defence: each sample's message clipped to this L2 norm (0: off)
    nopeek_weight: float = 0.0           # defence: NoPeek's distance correlation in every device's loss (0: off)
    ranks: torch.Tensor | None = None    # each device's LoRA rank (None: every device at the global adapter's)
    per_device: set[str] = field(default_factory=set)  # frozen tensors held per device (cut to each one's rank)
    cuts: list[int] | None = None        # each device's cut layer (None: every device at the device part's own)

    @property
    def adapter_device(self) -> torch.device:
        """Where the device part and the adapters run (the CPU, or an edge worker's GPU)."""
        return next(iter(self.adapter.values())).device if self.adapter else torch.device("cpu")

    def is_stacked(self, name: str) -> bool:
        """Whether each device holds its own copy of a tensor (trained, or frozen and cut to each device's rank)."""
        return self.adapter[name].requires_grad or name in self.per_device

    def stacked(self, name: str) -> torch.Tensor:
        """Every device's copy of a tensor (a frozen one is the same for all, unless cut to the devices' ranks)."""
        tensor = self.adapter[name]
        return tensor if self.is_stacked(name) else tensor.expand(len(self.devices), *tensor.shape)

    def adapter_of(self, position: int) -> Adapter:
        return {name: self.stacked(name)[position].detach().cpu().clone() for name in self.adapter}

    def weighted_sum(self, weights: list[float]) -> Adapter:
        """What `strategies.weighted_sum` gives over the devices' adapters (float64, devices with weight > 0); with
        devices at several cuts each block's tensors sum over the devices that hold that block only
        (`tensor_weights` gives each tensor's total weight)."""
        kept = [i for i, w in enumerate(weights) if w > 0]
        if not kept or not self.adapter:
            return {}
        out = {}
        # the devices that hold each tensor, and their index and weights, once per distinct set (one set with one cut)
        chosen: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        for name in self.adapter:  # on the CPU: the sum leaves the process (an edge worker's GPU) anyway
            block = None if self.cuts is None else block_of(name)
            held = tuple(kept if block is None else [i for i in kept if self.cuts[i] > block])  # type: ignore[index]
            if not held:
                continue
            if held not in chosen:
                chosen[held] = torch.tensor(held), torch.tensor([weights[i] for i in held], dtype=torch.float64)
            index, w = chosen[held]
            stacked = self.stacked(name).detach().cpu().index_select(0, index).double()
            out[name] = (w.reshape(-1, *[1] * (stacked.dim() - 1)) * stacked).sum(0)
        return out

    def holds(self, position: int, name: str) -> bool:
        """Whether the device at `position` holds (and trains) the tensor: a block's tensors are held by the devices
        cut below that block only."""
        if self.cuts is None:
            return True
        block = block_of(name)
        return block is None or block < self.cuts[position]

    def tensor_weights(self, weights: list[float]) -> dict[str, float]:
        """Each tensor's total aggregation weight: over the devices that hold it (`holds`), the weight > 0 ones."""
        return {name: float(sum(w for i, w in enumerate(weights) if w > 0 and self.holds(i, name)))
                for name in self.adapter}


def at_ranks(name: str, tensor: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Each device's copy of a global tensor at its own rank, kept at the global shape: a LoRA A's rows and a LoRA
    B's columns beyond the device's rank are exact zeros (HetLoRA's truncation, zero-padded back)."""
    stacked = tensor.detach().unsqueeze(0).repeat(len(ranks), *[1] * tensor.dim())
    dim = rank_dim(name)
    if dim is not None:
        beyond = torch.arange(tensor.shape[dim], device=tensor.device) >= ranks.to(tensor.device)[:, None]
        stacked.masked_fill_(beyond[:, :, None] if dim == 0 else beyond[:, None, :], 0.0)
    return stacked


def start(part: nn.Module, devices: list[int], global_adapter: Adapter, lr: float, proximal_mu: float,
          frozen: list[str], ranks: list[int] | None = None, cuts: list[int] | None = None) -> Cohort:
    """Every device starts from the global adapter with a fresh AdamW state over its trained tensors.

    `ranks` (one per device, each at most the global adapter's): each device trains its own rank's part of every
    LoRA factor. Its copy keeps the global shape with the rest exact zeros; a zero row of A and the zero column of
    B beside it get exactly zero gradients, so AdamW (weight decay 0) leaves them zero, the product B A is the
    device's own rank's, and the LoRA forward scales each device by alpha / its rank as peft does: the batched step
    equals each device run alone through peft at its own rank, and the weighted sum is the zero-padded average.
    FedProx's anchor and FFA-LoRA's frozen A are cut the same way, per device. `cuts` (one per device, each at
    most the device part's): a device runs and trains the blocks below its own cut only (`DevicePart.at`); the
    tensors of deeper blocks get no gradient from it, so its copy of them stays the global one."""
    adapter: Adapter = {}
    stacked_ranks = torch.tensor(ranks, dtype=torch.int64) if ranks is not None else None
    per_device: set[str] = set()
    for name, tensor in global_adapter.items():
        if stacked_ranks is not None and rank_dim(name) is not None:
            adapter[name] = at_ranks(name, tensor, stacked_ranks)
            if name in frozen:
                per_device.add(name)
            else:
                adapter[name].requires_grad_()
        elif name in frozen:
            adapter[name] = tensor.detach()
        else:
            adapter[name] = tensor.detach().unsqueeze(0).repeat(len(devices), *[1] * tensor.dim()).requires_grad_()
    trained = [t for t in adapter.values() if t.requires_grad]
    # foreach: one multi-tensor update whose elementwise maths are torch's per-device AdamW (weight_decay=0)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0, foreach=True) if trained else None
    anchor = global_adapter if proximal_mu > 0 else None
    if anchor is not None and stacked_ranks is not None:  # each device's own rank's part of the global adapter
        anchor = {name: at_ranks(name, t, stacked_ranks) if rank_dim(name) is not None else t
                  for name, t in anchor.items()}
    where = next(iter(global_adapter.values())).device if global_adapter else torch.device("cpu")
    return Cohort(list(devices), adapter, optimizer, anchor, proximal_mu, per_device=per_device,
                  ranks=None if stacked_ranks is None else stacked_ranks.to(where), cuts=list(cuts) if cuts else None)


def stack_batches(batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mini-batches of one sequence length as one batch, rows grouped by device."""
    return torch.cat([b.input_ids for b in batches]), torch.cat([b.attention_mask for b in batches])


def layout(live: list[int], batches: list[Batch], cut: int | None = None) -> Layout:
    """On the batches' device (where the adapters are)."""
    device = batches[0].input_ids.device
    samples = [len(b) for b in batches]
    most = max(samples)
    index = None
    if min(samples) != most:
        index = torch.cat([torch.arange(n) + d * most for d, n in enumerate(samples)]).to(device)
    return Layout(torch.tensor(live, device=device), samples, index, cut)


def _lora_forward(module: Any, name: str, cohort: Cohort, where: Layout, x: torch.Tensor, *args, **kwargs
                  ) -> torch.Tensor:
    """peft's LoRA forward (base layer + B A x * scaling, dtypes as peft casts them) with each device's A and B."""
    result = module.base_layer(x, *args, **kwargs)
    result_dtype = result.dtype
    names = [f"{name}.lora_{part}.{LORA}.weight" for part in "AB"]
    a, b = (cohort.adapter[n] for n in names)
    some = len(where.samples) < len(cohort.devices)
    if cohort.is_stacked(names[0]) and some:
        a = a.index_select(0, where.live)
    if cohort.is_stacked(names[1]) and some:
        b = b.index_select(0, where.live)
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != a.dtype:
        x = x.to(a.dtype)
    rows = where.to_devices(x)
    delta = torch.matmul(torch.matmul(rows, a.transpose(-1, -2)), b.transpose(-1, -2))
    if cohort.ranks is None:
        delta = delta * module.scaling[LORA]
    else:  # peft's scaling at each device's own rank: alpha / r (alpha / sqrt(r) with rsLoRA)
        ranks = (cohort.ranks.index_select(0, where.live) if some else cohort.ranks).double()
        per_device = module.lora_alpha[LORA] / (ranks.sqrt() if module.use_rslora.get(LORA, False) else ranks)
        delta = delta * per_device.to(delta.dtype).reshape(-1, 1, 1)
    result = result + where.from_devices(delta, x).to(result.dtype)
    return result.to(result_dtype)


@contextmanager
def batched_lora(part: nn.Module, cohort: Cohort, where: Layout) -> Iterator[None]:
    """Within: every LoRA layer of `part` applies each live device's own adapter to that device's rows."""
    layers: list[tuple[str, Any]] = [(name, m) for name, m in part.named_modules()
                                           if isinstance(m, LoraLayer) and LORA in m.lora_A]
    try:
        for name, module in layers:
            module.forward = functools.partial(_lora_forward, module, name, cohort, where)
        yield
    finally:
        for _, module in layers:
            del module.forward


def chunks(live: list[int], batches: list[Batch], cuts: list[int] | None = None) -> list[Chunk]:
    """The live devices in stacked batches: devices of one sequence length (and one cut, `cuts` per live device)
    together (padding a sequence further changes bf16 attention in its last bit, so each device keeps exactly its
    own length), at most about CHUNK_SAMPLES samples each."""
    lengths: dict[tuple[int, int | None], list[int]] = {}
    for j, batch in enumerate(batches):
        lengths.setdefault((int(batch.attention_mask.shape[1]), None if cuts is None else cuts[j]), []).append(j)
    out = []
    for (_, cut), members in lengths.items():
        runs: list[list[int]] = [[]]
        size = 0
        for j in members:
            if runs[-1] and size + len(batches[j]) > CHUNK_SAMPLES:
                runs.append([])
                size = 0
            runs[-1].append(j)
            size += len(batches[j])
        for run in runs:
            ids, mask = stack_batches([batches[j] for j in run])
            out.append((run, ids, mask, layout([live[j] for j in run], [batches[j] for j in run], cut)))
    return out


def forward(part: nn.Module, cohort: Cohort, live: list[int], batches: list[Batch], step: int) -> torch.Tensor:
    """The device part over the live devices' batches; returns the rows of their real tokens, device after device.

    Above KEEP_GRAPH_SAMPLES samples no graph is kept: the backward recomputes each chunk's forward (the same
    computation, so the same values), which bounds the memory of a step by one chunk's activations.
    """
    pieces: list[torch.Tensor | None] = [None] * len(batches)
    work = chunks(live, batches, None if cohort.cuts is None else [cohort.cuts[i] for i in live])
    keep = cohort.optimizer is not None and sum(len(b) for b in batches) <= KEEP_GRAPH_SAMPLES
    graphs: list[torch.Tensor | None] = []
    for members, ids, mask, where in work:
        at = part if where.cut is None else part.at(where.cut)  # type: ignore[operator]  # a DevicePart
        with torch.set_grad_enabled(keep), batched_lora(at, cohort, where):
            hidden = at(ids, mask)
        graphs.append(hidden if keep else None)
        counts = [int(batches[j].attention_mask.sum()) for j in members]
        for j, piece in zip(members, torch.split(hidden.detach()[mask.bool()], counts), strict=True):
            pieces[j] = piece
    if cohort.optimizer is not None:
        cohort.pending[step] = list(zip(work, graphs, strict=True))
    return torch.cat([p for p in pieces if p is not None])


def backward(part: nn.Module, cohort: Cohort, step: int, gradients: list[Encoded | None]) -> None:
    """Each live device's received activation gradient through its chunk's recomputed forward, then one AdamW
    step for all devices."""
    work = cohort.pending.pop(step)
    if cohort.optimizer is None:
        return
    if all(g is None for g in gradients):
        # nothing to send back through the device part; a U-shaped split's head may still have trained
        if any(t.grad is not None for t in cohort.adapter.values()):
            local_step(cohort.adapter, cohort.optimizer, cohort.anchor, cohort.proximal_mu)
        return
    received = [g for g in gradients if g is not None]
    if len(received) != len(gradients):
        raise ValueError("the server sent gradients to some live devices only")
    decoded = torch.split(codec.decode_many(received).to(cohort.adapter_device),
                          [int(np.prod(g.shape[:-1])) for g in received])
    for (members, ids, mask, where), kept in work:
        hidden = kept
        at = part if where.cut is None else part.at(where.cut)  # type: ignore[operator]  # a DevicePart
        if hidden is None:
            with torch.enable_grad(), batched_lora(at, cohort, where):
                hidden = at(ids, mask)
        if cohort.clip_norm > 0 or cohort.nopeek_weight > 0:
            _defended_backward(at, cohort, ids, mask, where, hidden, torch.cat([decoded[j] for j in members]))
            continue
        full = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        full[mask.bool()] = torch.cat([decoded[j] for j in members])
        hidden.backward(full)
    # a device that dropped out has a zero gradient here and its state moves on, but its adapter is never used
    local_step(cohort.adapter, cohort.optimizer, cohort.anchor, cohort.proximal_mu)


def _defended_backward(part: Any, cohort: Cohort, ids: torch.Tensor, mask: torch.Tensor, where: Layout,
                       hidden: torch.Tensor, received: torch.Tensor) -> None:
    """The backward of a chunk under the defences: the received gradient is the sent (clipped) message's, so it
    goes back through the clipping; NoPeek adds each device's weighted distance correlation between its inputs
    and its smashed data (over its own samples, two at least) to its loss."""
    lengths = mask.sum(1)
    sent = clip_packed(hidden[mask.bool()], lengths, cohort.clip_norm)
    objective = (sent * received.to(sent.dtype)).sum()
    if cohort.nopeek_weight > 0:
        with torch.no_grad():
            inputs = part.input_vectors(ids)
        start = 0
        for count in where.samples:
            rows = slice(start, start + count)
            if count >= 2:
                objective = objective + cohort.nopeek_weight * nopeek_loss(inputs[rows], hidden[rows], mask[rows])
            start += count
    objective.backward()
