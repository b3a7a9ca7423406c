"""The device part's side of a local step for the devices a process holds: forward on each device's mini-batch,
smashed data encoded with each device's own stream; decoded gradients through the backward, one optimizer step.

A virtual device is data: an id, its adapter and its optimizer state for the round. All of a process's devices
share the device part's frozen (possibly quantized) base weights and run as one batched cohort
(`sflam.platform.cohort`); device by device is a cohort of one.
"""

from __future__ import annotations

import torch

from sflam.platform import codec, cohort
from sflam.platform.codec import Encoded
from sflam.platform.cohort import Cohort
from sflam.platform.data import Batch
from sflam.platform.messages import FEATURE_GRADIENTS_UP, NOISE, UPLINK, Smashed, codec_generator, real_rows
from sflam.platform.split import DevicePart, HeadPart
from sflam.platform.strategies import Adapter, FitInstructions, trainable_state
from sflam.privacy.defences import clip_and_noise_packed

TOP = "top."  # the adapter's names of a U-shaped split's head tensors (trained on the device, averaged like LoRA)


class DeviceRunner:
    """Runs the device part for any number of virtual devices, as cohorts."""

    def __init__(self, part: DevicePart, activation_bits: int, gradient_bits: int, side_dtype: str,
                 lr: float, seed: int, head: HeadPart | None = None, clip_norm: float = 0.0, noise_sigma: float = 0.0,
                 nopeek_weight: float = 0.0) -> None:
        self.part = part
        # defences of the smashed data (docs/concepts/privacy.md): per-sample clipping, Gaussian noise, NoPeek
        self.clip_norm, self.noise_sigma, self.nopeek_weight = clip_norm, noise_sigma, nopeek_weight
        self.head = head  # a U-shaped split's head, on the device (None: the head is on the server)
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
        """Whether the device part itself has trained tensors (a U-shaped split's head trains regardless)."""
        return any(p.requires_grad for p in self.part.parameters())

    def initial_adapter(self) -> Adapter:
        adapter = trainable_state(self.part)
        if self.head is not None:
            adapter.update({TOP + name: p.detach().clone() for name, p in self.head.named_parameters()
                            if not name.startswith("label_")})
        return adapter

    def start(self, devices: list[int], global_adapter: Adapter, lr_factor: float = 1.0,
              fit: FitInstructions | None = None, ranks: list[int] | None = None, cuts: list[int] | None = None
              ) -> Cohort:
        """Every listed device starts from the global adapter with a fresh optimizer over its trained tensors
        (the adapters stacked, one optimizer over them); `ranks`, one per device (None or empty: all at the global
        adapter's rank), cuts each device's LoRA factors to its own rank; `cuts`, one per device (None or empty: all
        at the part's cut), runs each device to its own cut layer (`cohort.start`)."""
        fit = fit or FitInstructions()
        frozen = [name for name in global_adapter if fit.is_frozen(name)]
        group = cohort.start(self.part, devices, self.here(global_adapter), self.lr * lr_factor, fit.proximal_mu,
                             frozen, list(ranks) if ranks else None, list(cuts) if cuts else None)
        group.clip_norm, group.nopeek_weight = self.clip_norm, self.nopeek_weight
        return group

    def forward(self, group: Cohort, live: list[int], batches: list[Batch], round_index: int, step: int,
                bits: list[int]) -> list[Smashed]:
        """The live devices (positions in the cohort) on their mini-batches, as one computation; every device's
        smashed data is encoded at its own bits (0: the config's) with its own stream."""
        if not live:  # every device of this cohort has dropped out
            return []
        rows = cohort.forward(self.part, group, live, [b.to(self.compute) for b in batches], step).cpu()
        devices = [group.devices[i] for i in live]
        counts = [int(b.attention_mask.sum()) for b in batches]
        if self.clip_norm > 0:  # each sample's whole message clipped, then noised with the device's own stream
            rows = torch.cat([clip_and_noise_packed(piece, b.attention_mask.sum(1), self.clip_norm, self.noise_sigma,
                                                    codec_generator(self.seed, round_index, step, k, NOISE))
                              for piece, b, k in zip(torch.split(rows, counts), batches, devices, strict=True)])
        generators = [codec_generator(self.seed, round_index, step, k, UPLINK) for k in devices]
        encoded = codec.encode_many(rows, counts, [q or self.activation_bits for q in bits],
                                    generators, self.side_dtype)
        group.samples_trained += sum(len(b) for b in batches)
        # a U-shaped split keeps its labels on the device
        cuts = [None if group.cuts is None else group.cuts[i] for i in live]
        return [Smashed(k, e, b.attention_mask, b.labels if self.head is None else b.labels[:0], cut)
                for k, e, b, cut in zip(devices, encoded, batches, cuts, strict=True)]

    def head_step(self, group: Cohort, live: list[int], features: list[Encoded], batches: list[Batch], total: int,
                  round_index: int, step: int) -> tuple[list[Encoded], float, int]:
        """A U-shaped split's head on the live devices: each device's decoded features through its own head
        tensors, its loss on its own labels (as a share of the step's mean over all `total` samples), the
        features' gradient encoded with its own stream; the head's gradients wait for the device's optimizer step.
        Returns the gradients, the summed loss and the correct predictions."""
        assert self.head is not None
        devices = [group.devices[i] for i in live]
        names = [name for name in group.adapter if name.startswith(TOP)]
        grads, loss_sum, correct = [], 0.0, 0
        for i, encoded, batch in zip(live, features, batches, strict=True):
            inputs = codec.decode(encoded).to(self.compute).requires_grad_()
            params = {name[len(TOP):]: group.stacked(name)[i] for name in names}
            with torch.enable_grad():
                logits = torch.func.functional_call(self.head, params, (inputs,), strict=False)
                loss, hits = self.head.loss_and_correct(logits, batch.labels.to(self.compute))
                (loss * (len(batch) / total)).backward()
            loss_sum += float(loss.detach()) * len(batch)
            correct += int(hits)
            grads.append(inputs.grad.cpu())  # type: ignore[union-attr]
        generators = [codec_generator(self.seed, round_index, step, k, FEATURE_GRADIENTS_UP) for k in devices]
        encoded_grads = codec.encode_many(torch.cat(grads), [len(b) for b in batches],
                                          [self.gradient_bits] * len(live), generators, codec.GRADIENT_SIDE_DTYPE)
        return list(encoded_grads), loss_sum, correct

    def backward(self, group: Cohort, step: int, gradients: list[Encoded | None]) -> None:
        """The live devices' received gradients (in their order) through the backward, one optimizer step."""
        if group.optimizer is not None and step in group.pending:
            cohort.backward(self.part, group, step, gradients)

    @torch.no_grad()
    def infer(self, adapter: Adapter, batch: Batch, generator: torch.Generator, cut: int | None = None) -> Smashed:
        """The deployed device part on an evaluation batch (one adapter, no graph), its smashed data encoded; `cut`:
        a device at that cut (None: the part's own)."""
        inputs = batch.to(self.compute)
        part = self.part if cut is None else self.part.at(cut)
        names = {name for name, _ in part.named_parameters()}
        bottom = {name: t for name, t in self.here(adapter).items() if name in names}
        hidden = torch.func.functional_call(part, bottom, (inputs.input_ids, inputs.attention_mask), strict=False)
        encoded = codec.encode(real_rows(hidden, inputs.attention_mask).cpu(), self.activation_bits, generator,
                               self.side_dtype)
        return Smashed(-1, encoded, batch.attention_mask, batch.labels, cut)

    @torch.no_grad()
    def infer_head(self, adapter: Adapter, features: Encoded, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """A U-shaped split's deployed head on an evaluation batch's decoded features: its loss and correct."""
        assert self.head is not None
        params = {name[len(TOP):]: t for name, t in self.here(adapter).items() if name.startswith(TOP)}
        logits = torch.func.functional_call(self.head, params, (codec.decode(features).to(self.compute),),
                                            strict=False)
        return self.head.loss_and_correct(logits, batch.labels.to(self.compute))
