"""The split-learning local step, written once for every runtime and method.

One local step over the devices still in the round: each device runs its part forward on a mini-batch of its own
data and encodes the smashed data (uplink); the server part runs forward and backward on every device's
micro-batch as one batch (mean loss), steps its optimizer and encodes each device's activation gradient
(downlink); each device decodes its gradient, runs its backward and steps its own optimizer. Federated learning
has no server part in the step: each device trains the whole model on its own loss and nothing crosses the link.
A U-shaped split (`split.head: device`) keeps the head and the loss on the device, so the labels never leave it:
the server sends its part's features down and gets their gradient back before its backward, two more
transmissions and one more barrier per step (`u_shaped_steps`).

What differs between runtimes is only where each part runs and how messages travel, behind two small
interfaces: a `DeviceSide` (the device parts: one batched cohort in this process, edge-worker actors, one device
at a time) and a `ServerSide` (the server part: in this process, a torch or DeepSpeed rank group on Ray). The
messages themselves are opaque here: a list of `Smashed` in one process, object references on Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(kw_only=True)
class Uplink:
    """What the live devices sent in a local step: their messages (as the server side takes them) and bits."""

    messages: Any
    bits: int


@dataclass(kw_only=True)
class Downlink:
    """The server part's answer to a local step: each device's gradient (as the device side takes them), the
    step's mean loss and counts, and the gradients' bits."""

    gradients: Any
    loss: float
    correct: int
    samples: int
    bits: int


@dataclass(kw_only=True)
class StepFigures:
    """The figures of a round's local steps, added up step by step."""

    step_losses: list[float] = field(default_factory=list)
    correct: int = 0
    samples: int = 0
    uplink_bits: int = 0
    downlink_bits: int = 0

    def add(self, uplink_bits: int, downlink: Downlink) -> None:
        self.step_losses.append(downlink.loss)
        self.correct += downlink.correct
        self.samples += downlink.samples
        self.uplink_bits += uplink_bits
        self.downlink_bits += downlink.bits

    def extend(self, other: StepFigures) -> None:
        self.step_losses.extend(other.step_losses)
        self.correct += other.correct
        self.samples += other.samples
        self.uplink_bits += other.uplink_bits
        self.downlink_bits += other.downlink_bits


class DeviceSide(Protocol):
    """Where the round's device parts run."""

    def forward(self, step: int) -> Uplink:
        """The live devices' parts forward on their mini-batches of `step`, smashed data encoded."""
        ...

    def backward(self, step: int, downlink: Downlink) -> None:
        """The live devices' decoded gradients through their backward, each device's optimizer step."""
        ...


class ServerSide(Protocol):
    """Where the server part runs."""

    def step(self, step: int, uplink: Uplink) -> Downlink:
        """Forward/backward of the mean loss over every message, one optimizer step, encoded gradients."""
        ...


class UShapedDeviceSide(DeviceSide, Protocol):
    """The device parts of a U-shaped split: the bottom (`forward`, `backward`) and the head."""

    def head(self, step: int, features: Uplink) -> HeadAnswer:
        """The live devices' heads on the server's decoded features: their losses on their own labels, the
        features' gradients encoded (up)."""
        ...


class UShapedServerSide(Protocol):
    """The server part of a U-shaped split: its forward to the features, then its backward from their gradient."""

    def forward(self, step: int, uplink: Uplink) -> Uplink:
        """The server part's features of every device's samples, each device's encoded (down)."""
        ...

    def backward(self, step: int, gradients: Uplink) -> Downlink:
        """The features' gradients through the server part, one optimizer step, the smashed data's gradients."""
        ...


@dataclass(kw_only=True)
class HeadAnswer:
    """What the devices' heads give back in a U-shaped step: the features' gradients (up) and the step's loss."""

    gradients: Uplink
    loss: float
    correct: int
    samples: int


class WholeModelSide(Protocol):
    """Devices that train the whole model on their own loss (federated learning): no server in the step."""

    def train(self, step: int) -> Downlink:
        """The live devices' forward, loss, backward and optimizer step; the figures as a server would report
        them (no gradients, no bits)."""
        ...


def local_steps(steps: int, live: list[int], devices: DeviceSide, server: ServerSide) -> StepFigures:
    """Run a round's local steps of split learning: `live[e]` devices take part in step e (the round ends early
    when none does)."""
    figures = StepFigures()
    for step in range(steps):
        if not live[step]:
            break  # every device has dropped out
        # ---- devices: forward, smashed data encoded (uplink)
        uplink = devices.forward(step)
        # ---- server: one batch over every device's micro-batch, one optimizer step, gradients encoded (downlink)
        downlink = server.step(step, uplink)
        # ---- devices: decoded gradients through the backward, each device's optimizer step
        devices.backward(step, downlink)
        figures.add(uplink.bits, downlink)
    return figures


def u_shaped_steps(steps: int, live: list[int], devices: UShapedDeviceSide, server: UShapedServerSide
                   ) -> StepFigures:
    """A U-shaped split's local steps: four transmissions and two server barriers per step, the loss on the
    devices (each device's share of the step's mean over every sample)."""
    figures = StepFigures()
    for step in range(steps):
        if not live[step]:
            break
        # ---- devices: bottom forward, smashed data encoded (uplink)
        uplink = devices.forward(step)
        # ---- server: its part's forward over every device's micro-batch, the features encoded (downlink)
        features = server.forward(step, uplink)
        # ---- devices: the head and the loss on their own labels, the features' gradients encoded (uplink)
        answer = devices.head(step, features)
        # ---- server: backward from those gradients, one optimizer step, the smashed data's gradients (downlink)
        downlink = server.backward(step, answer.gradients)
        # ---- devices: bottom backward, each device's optimizer step (head included)
        devices.backward(step, downlink)
        figures.add(uplink.bits + answer.gradients.bits,
                    Downlink(gradients=None, loss=answer.loss / answer.samples, correct=answer.correct,
                             samples=answer.samples, bits=features.bits + downlink.bits))
    return figures


def whole_model_steps(steps: int, live: list[int], devices: WholeModelSide) -> StepFigures:
    """Federated learning's local steps: the same cadence, no server part and nothing on the link per step."""
    figures = StepFigures()
    for step in range(steps):
        if not live[step]:
            break
        figures.add(0, devices.train(step))
    return figures
