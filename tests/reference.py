"""The device-by-device reference of a device's local step: one device's adapter through peft's own LoRA layers
(`torch.func.functional_call`), one AdamW per device. The batched cohort (`sflam.platform.cohort`) must equal it
within float rounding (tests/platform/test_cohort.py); it is kept here, not in the package, because nothing
else runs it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sflam.platform import codec
from sflam.platform.codec import Encoded
from sflam.platform.data import Batch
from sflam.platform.device import DeviceRunner
from sflam.platform.messages import UPLINK, Smashed, codec_generator, real_rows, scatter_rows
from sflam.platform.strategies import Adapter, FitInstructions, local_step


@dataclass
class DeviceState:
    """A virtual device in a round: its adapter (a copy of the global one) and its optimizer."""

    device: int
    adapter: Adapter
    optimizer: torch.optim.Optimizer | None
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    anchor: Adapter | None = None
    proximal_mu: float = 0.0


def start(runner: DeviceRunner, device: int, global_adapter: Adapter, lr_factor: float = 1.0,
          fit: FitInstructions | None = None) -> DeviceState:
    """A device's round starts from the global adapter with a fresh AdamW over its trained tensors."""
    fit = fit or FitInstructions()
    adapter = {name: t.detach().clone().requires_grad_(not fit.is_frozen(name)) for name, t in global_adapter.items()}
    trained = [t for t in adapter.values() if t.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=runner.lr * lr_factor, weight_decay=0.0) if trained else None
    anchor = global_adapter if fit.proximal_mu > 0 else None
    return DeviceState(device, adapter, optimizer, anchor=anchor, proximal_mu=fit.proximal_mu)


def forward(runner: DeviceRunner, state: DeviceState, batch: Batch, round_index: int, step: int, bits: int
            ) -> Smashed:
    """The device part forward with this device's adapter, smashed data encoded with its stream."""
    grad_mode = torch.enable_grad() if state.adapter else torch.no_grad()
    with grad_mode:
        hidden = torch.func.functional_call(runner.part, state.adapter, (batch.input_ids, batch.attention_mask),
                                            strict=False)
    generator = codec_generator(runner.seed, round_index, step, state.device, UPLINK)
    encoded = codec.encode(real_rows(hidden, batch.attention_mask), bits, generator, runner.side_dtype)
    if state.adapter:
        state.pending[step] = (hidden, batch.attention_mask)
    return Smashed(state.device, encoded, batch.attention_mask, batch.labels)


def backward(state: DeviceState, step: int, gradient: Encoded | None) -> None:
    """The server's encoded activation gradient through the backward, then the device's optimizer step."""
    if gradient is None or state.optimizer is None:
        return
    hidden, mask = state.pending.pop(step)
    hidden.backward(scatter_rows(codec.decode(gradient), mask))
    local_step(state.adapter, state.optimizer, state.anchor, state.proximal_mu)


def final_adapter(state: DeviceState) -> Adapter:
    return {name: t.detach().clone() for name, t in state.adapter.items()}
