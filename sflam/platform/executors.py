"""What a device and the server do in one local step, as plain PyTorch (DESIGN §5).

The reference runtime calls these in one process; the Ray actors call the same code. A virtual
device is data: an id, its adapter tensors and its optimizer. The device part's frozen base weights
are shared by all virtual devices. The devices an executor holds run as one cohort, one batched
computation per local step (`sflam.platform.cohort`); the device-by-device path (`start`, `forward`,
`backward`: each device's forward with its own adapter through `torch.func.functional_call`) is the
reference the cohort is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sflam.platform import codec, cohort
from sflam.platform.codec import Encoded
from sflam.platform.cohort import Cohort
from sflam.platform.data import Batch
from sflam.platform.split import DevicePart, ServerPart
from sflam.platform.strategies import FitInstructions, local_step, weighted_average, weighted_sum

__all__ = ["Cohort", "DeviceExecutor", "Messages", "ServerExecutor", "fedavg", "weighted_sum"]

Adapter = dict[str, torch.Tensor]

UPLINK, DOWNLINK = 0, 1
SERVER_CHUNK_SAMPLES = 512  # samples per server forward/backward within one local step (`server_chunks`)


def codec_generator(seed: int, round_index: int, step: int, device: int, direction: int) -> torch.Generator:
    """The stochastic-rounding stream of one transmission, the same in every runtime."""
    state = np.random.SeedSequence([seed, round_index, step, device + 3, direction]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def server_chunks(lengths: np.ndarray) -> list[np.ndarray]:
    """The samples (positions in message order) of each forward/backward of a server step, each run padded to
    its longest sample: all of them in order up to SERVER_CHUNK_SAMPLES, more in chunks of that many in order of
    their real length (so almost no work goes to padding). The cost model charges exactly these chunks."""
    n = len(lengths)
    if n <= SERVER_CHUNK_SAMPLES:
        return [np.arange(n)]
    order = np.argsort(lengths, kind="stable")
    return [order[a:a + SERVER_CHUNK_SAMPLES] for a in range(0, n, SERVER_CHUNK_SAMPLES)]


@dataclass
class Smashed:
    """One device's uplink message of a local step: encoded activations of its real tokens."""

    device: int
    activations: Encoded
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def payload_bits(self) -> int:
        # side header: per sample, the sequence length (16 bits) and the label (16 bits)
        return self.activations.payload_bits + 32 * int(self.labels.shape[0])


class Messages(list):  # type: ignore[type-arg]
    """One executor's smashed messages of a step, crossing processes as a few arrays (one object per worker and
    step: thousands of small messages pickle one by one far more slowly). Unpickled, the same list."""

    def __reduce__(self) -> tuple[Any, ...]:
        masks = [m.attention_mask for m in self]
        labels = [m.labels for m in self]
        encoded = codec.pack_many([m.activations for m in self])
        if (encoded is None or len({t.dtype for t in masks}) > 1 or len({t.dtype for t in labels}) > 1
                or any(t.requires_grad for t in masks + labels)):
            return (list, (list(self),))
        mask_flat = torch.cat([t.reshape(-1) for t in masks]).numpy() if masks else np.zeros(0, np.int64)
        label_flat = torch.cat([t.reshape(-1) for t in labels]).numpy() if labels else np.zeros(0, np.int64)
        shapes = [(tuple(a.shape), tuple(b.shape)) for a, b in zip(masks, labels, strict=True)]
        return (_messages, ([m.device for m in self], encoded, mask_flat, label_flat, shapes))


def _messages(devices: list[int], encoded: tuple[Any, ...], mask_flat: np.ndarray, label_flat: np.ndarray,
              shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> Messages:
    masks, labels = torch.from_numpy(mask_flat.copy()), torch.from_numpy(label_flat.copy())
    out = Messages()
    a = b = 0
    for device, activations, (mask_shape, label_shape) in zip(devices, codec.unpack_many(encoded), shapes,
                                                              strict=True):
        m, n = int(np.prod(mask_shape)), int(np.prod(label_shape))
        out.append(Smashed(device, activations, masks[a:a + m].view(mask_shape),  # type: ignore[arg-type]
                           labels[b:b + n].view(label_shape)))
        a, b = a + m, b + n
    return out


@dataclass
class DeviceState:
    """A virtual device in a round: its adapter (a copy of the global one) and its optimizer."""

    device: int
    adapter: Adapter
    optimizer: torch.optim.Optimizer | None
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    samples_trained: int = 0
    anchor: Adapter | None = None  # the global adapter, for FedProx's proximal term
    proximal_mu: float = 0.0


def trainable_state(module: torch.nn.Module) -> Adapter:
    """Detached fp32 copies of a module's trainable tensors (adapters, and a new head)."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


fedavg = weighted_average  # the sample-weighted mean of adapters (FedAvg)


def _rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[mask.bool()]


def _scatter(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    full = torch.zeros((*mask.shape, rows.shape[-1]), dtype=rows.dtype, device=rows.device)
    full[mask.bool()] = rows
    return full


class DeviceExecutor:
    """Runs the device part for any number of virtual devices."""

    def __init__(self, part: DevicePart, activation_bits: int, gradient_bits: int, side_dtype: str,
                 lr: float, seed: int) -> None:
        self.part = part
        self.activation_bits = activation_bits
        self.gradient_bits = gradient_bits
        self.side_dtype = side_dtype
        self.lr = lr
        self.seed = seed
        self.compute = torch.device("cpu")  # where the device part runs; messages and adapters travel on the CPU

    def place(self, device: torch.device) -> None:
        """Run the device part on `device` (an edge worker's GPU): its weights (quantized ones stay quantized)
        move there once; batches, adapters and received gradients follow it, and what leaves (smashed data
        before the codec, adapters) comes back to the CPU."""
        self.part.to(device)
        self.compute = device

    def here(self, adapter: Adapter) -> Adapter:
        """The adapter's tensors where the device part runs (the same tensors when already there)."""
        return {name: t.to(self.compute) for name, t in adapter.items()}

    @property
    def trains(self) -> bool:
        return any(p.requires_grad for p in self.part.parameters())

    def initial_adapter(self) -> Adapter:
        return trainable_state(self.part)

    def start(self, device: int, global_adapter: Adapter, lr_factor: float = 1.0,
              fit: FitInstructions | None = None) -> DeviceState:
        """A device's round starts from the global adapter with a fresh optimizer over its trained tensors."""
        fit = fit or FitInstructions()
        global_adapter = self.here(global_adapter)
        adapter = {name: t.detach().clone().requires_grad_(not fit.is_frozen(name))
                   for name, t in global_adapter.items()}
        trained = [t for t in adapter.values() if t.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=self.lr * lr_factor, weight_decay=0.0) if trained else None
        anchor = global_adapter if fit.proximal_mu > 0 else None
        return DeviceState(device, adapter, optimizer, anchor=anchor, proximal_mu=fit.proximal_mu)

    def forward(self, state: DeviceState, batch: Batch, round_index: int, step: int, bits: int | None = None
                ) -> Smashed:
        """Device part forward on a mini-batch, smashed data encoded at `bits` (the plan's, else the config's);
        keeps the graph for the backward of this step."""
        grad_mode = torch.enable_grad() if state.adapter else torch.no_grad()
        inputs = batch.to(self.compute)
        with grad_mode:
            hidden = torch.func.functional_call(self.part, state.adapter, (inputs.input_ids, inputs.attention_mask),
                                                strict=False)
        generator = codec_generator(self.seed, round_index, step, state.device, UPLINK)
        encoded = codec.encode(_rows(hidden, inputs.attention_mask).cpu(), bits or self.activation_bits, generator,
                               self.side_dtype)
        if state.adapter:
            state.pending[step] = (hidden, inputs.attention_mask)
        state.samples_trained += len(batch)
        return Smashed(state.device, encoded, batch.attention_mask, batch.labels)

    def backward(self, state: DeviceState, step: int, gradient: Encoded | None) -> None:
        """Apply the server's encoded activation gradient and step the device's optimizer."""
        if gradient is None or state.optimizer is None:
            return
        hidden, mask = state.pending.pop(step)
        hidden.backward(_scatter(codec.decode(gradient).to(self.compute), mask))
        local_step(state.adapter, state.optimizer, state.anchor, state.proximal_mu)

    def final_adapter(self, state: DeviceState) -> Adapter:
        return {name: t.detach().cpu().clone() for name, t in state.adapter.items()}

    # ------------------------------------------------------------------ all of an executor's devices at once
    def start_cohort(self, devices: list[int], global_adapter: Adapter, lr_factor: float = 1.0,
                     fit: FitInstructions | None = None) -> Cohort:
        """`start` for every listed device, their adapters stacked and one optimizer over them."""
        fit = fit or FitInstructions()
        frozen = [name for name in global_adapter if fit.is_frozen(name)]
        return cohort.start(self.part, devices, self.here(global_adapter), self.lr * lr_factor, fit.proximal_mu,
                            frozen)

    def forward_cohort(self, group: Cohort, live: list[int], batches: list[Batch], round_index: int, step: int,
                       bits: list[int]) -> list[Smashed]:
        """`forward` of the live devices (positions in the cohort) on their mini-batches, as one computation;
        every device's smashed data is encoded with its own stream, so each message equals `forward`'s."""
        if not live:  # every device of this executor has dropped out
            return []
        rows = cohort.forward(self.part, group, live, [b.to(self.compute) for b in batches], step).cpu()
        devices = [group.devices[i] for i in live]
        counts = [int(b.attention_mask.sum()) for b in batches]
        generators = [codec_generator(self.seed, round_index, step, k, UPLINK) for k in devices]
        encoded = codec.encode_many(rows, counts, [q or self.activation_bits for q in bits],
                                    generators, self.side_dtype)
        group.samples_trained += sum(len(b) for b in batches)
        return [Smashed(k, e, b.attention_mask, b.labels) for k, e, b in zip(devices, encoded, batches, strict=True)]

    def backward_cohort(self, group: Cohort, step: int, gradients: list[Encoded | None]) -> None:
        """`backward` of the live devices of a step (gradients in their order), one optimizer step for all."""
        if group.optimizer is not None and step in group.pending:
            cohort.backward(self.part, group, step, gradients)

    @torch.no_grad()
    def infer(self, adapter: Adapter, batch: Batch, generator: torch.Generator) -> Smashed:
        inputs = batch.to(self.compute)
        hidden = torch.func.functional_call(self.part, self.here(adapter), (inputs.input_ids, inputs.attention_mask),
                                            strict=False)
        encoded = codec.encode(_rows(hidden, inputs.attention_mask).cpu(), self.activation_bits, generator,
                               self.side_dtype)
        return Smashed(-1, encoded, batch.attention_mask, batch.labels)


@dataclass
class ServerStepResult:
    loss: float
    correct: int
    samples: int
    gradients: list[Encoded | None]

    @property
    def downlink_bits(self) -> list[int]:
        return [0 if g is None else g.payload_bits for g in self.gradients]


class ServerExecutor:
    """Runs the server part on all selected devices' micro-batches as one batch (mean loss)."""

    def __init__(self, part: ServerPart, gradient_bits: int, side_dtype: str, lr: float, seed: int,
                 send_gradients: bool) -> None:
        self.part = part
        self.gradient_bits = gradient_bits
        self.side_dtype = side_dtype
        self.seed = seed
        self.send_gradients = send_gradients
        params = [p for p in part.parameters() if p.requires_grad]
        self.lr = lr
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None

    def set_lr_factor(self, factor: float) -> None:
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * factor

    @staticmethod
    def assemble(messages: list[Smashed], length: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode every device's activations and pad them into one batch (right padding, to `length` if longer)."""
        length = max([length] + [int(m.attention_mask.shape[1]) for m in messages])
        mask = torch.cat([torch.nn.functional.pad(m.attention_mask, (0, length - int(m.attention_mask.shape[1])))
                          for m in messages])
        # every message's rows are its real tokens in order, so all decode into the stacked mask at once
        hidden = _scatter(codec.decode_many([m.activations for m in messages]), mask)
        return hidden, mask, torch.cat([m.labels for m in messages])

    def step(self, messages: list[Smashed], round_index: int, step: int) -> ServerStepResult:
        """Forward/backward of the mean loss over every message's samples, one optimizer step, encoded gradients.

        The samples run in the chunks of `server_chunks` (the gradients of the mean accumulate chunk by chunk), so
        the server's activation memory stays bounded at any number of devices. Padding never changes a real
        token's result (right padding, masked): the chunking changes the sums only at float rounding.
        """
        masks = [m.attention_mask for m in messages]
        lengths = torch.cat([mask.sum(1) for mask in masks]).long()  # every sample's real tokens
        labels = torch.cat([m.labels for m in messages])
        total = int(labels.shape[0])
        rows = codec.decode_many([m.activations for m in messages])  # sample by sample, real tokens in order
        chunks = server_chunks(lengths.numpy())
        starts = torch.cumsum(lengths, 0) - lengths  # each sample's first row
        grad_rows = torch.empty_like(rows) if self.send_gradients else None
        loss_sum, correct = 0.0, 0
        for positions in chunks:
            chunk = torch.from_numpy(positions)
            chunk_lengths = lengths[chunk]
            mask = (torch.arange(int(chunk_lengths.max())) < chunk_lengths[:, None]).to(masks[0].dtype)
            # the chunk's rows: each sample's run of real tokens, in the chunk's order
            first = torch.repeat_interleave(starts[chunk] - (torch.cumsum(chunk_lengths, 0) - chunk_lengths),
                                            chunk_lengths)
            index = first + torch.arange(int(chunk_lengths.sum()))
            hidden = _scatter(rows[index], mask)
            hidden.requires_grad_(self.send_gradients)
            with torch.enable_grad():
                logits = self.part(hidden, mask)
                loss, chunk_correct = self.part.loss_and_correct(logits, labels[chunk])
                if len(chunks) > 1:
                    loss = loss * (len(positions) / total)
                if self.optimizer is not None or self.send_gradients:
                    loss.backward()
            loss_sum += float(loss.detach())
            correct += int(chunk_correct)
            if grad_rows is not None:
                grad_rows[index] = _rows(hidden.grad, mask)  # type: ignore[arg-type]
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        gradients: list[Encoded | None] = [None] * len(messages)
        if grad_rows is not None:  # each device's rows with its own stream, all devices' statistics at once
            counts = [int(mask.sum()) for mask in masks]
            generators = [codec_generator(self.seed, round_index, step, m.device, DOWNLINK) for m in messages]
            gradients = list(codec.encode_many(grad_rows, counts, [self.gradient_bits] * len(messages),
                                               generators, self.side_dtype))
        return ServerStepResult(loss_sum, correct, total, gradients)

    @torch.no_grad()
    def evaluate(self, messages: list[Smashed]) -> tuple[float, int, int]:
        """Summed loss, correct predictions and samples over evaluation batches."""
        total_loss, total_correct, total = 0.0, 0, 0
        for message in messages:
            hidden, mask, labels = self.assemble([message])
            loss, correct = self.part.loss_and_correct(self.part(hidden, mask), labels)
            total_loss += float(loss) * int(labels.shape[0])
            total_correct += int(correct)
            total += int(labels.shape[0])
        return total_loss, total_correct, total

    def state(self) -> Adapter:
        return trainable_state(self.part)

    def checkpoint(self) -> dict[str, object]:
        """The trained tensors and the optimizer state: enough to continue exactly."""
        return {"part": self.state(), "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def restore(self, state: dict[str, object]) -> None:
        tensors = state["part"]
        assert isinstance(tensors, dict)
        with torch.no_grad():
            for name, p in self.part.named_parameters():
                if p.requires_grad:
                    p.copy_(tensors[name])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
