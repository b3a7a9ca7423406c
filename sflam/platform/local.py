"""The reference runtime (`runtime: local`): the round engine's backend in one process.

Every device of a round runs in this process as one batched cohort and the server part beside it; the local step
itself is `sflam.platform.protocol`'s. Selection, plan, aggregation, evaluation and checkpoints are the engine's,
the same for every runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sflam.platform.assembly import Experiment, merge_server_copies
from sflam.platform.cohort import Cohort
from sflam.platform.data import Batch, collate
from sflam.platform.device import DeviceRunner
from sflam.platform.engine import Backend, Engine, ProgressFn, RoundOutcome, RoundTask
from sflam.platform.messages import Smashed
from sflam.platform.protocol import Downlink, HeadAnswer, StepFigures, Uplink, local_steps, u_shaped_steps
from sflam.platform.quantization import kernel_path, stored_weight_bytes
from sflam.platform.results import Resume, RoundMetrics, RunResult
from sflam.platform.server import ServerRunner
from sflam.platform.split import overlap_names
from sflam.platform.strategies import Adapter


def collated(task: RoundTask, data_train: Any, pad_token_id: int, devices: list[int]) -> dict[int, list[Batch]]:
    """The listed devices' mini-batches of the round, collated from the task's sample indices."""
    return {k: [collate(data_train, idx, pad_token_id) for idx in task.indices[k]] for k in devices}


class CohortDevices:
    """The device side in this process: the round's devices (or a subset) as one cohort."""

    def __init__(self, runner: DeviceRunner, group: Cohort, task: RoundTask, positions: list[int],
                 batches: dict[int, list[Batch]]) -> None:
        self.runner, self.group, self.task = runner, group, task
        self.positions = positions  # the task's positions of the cohort's devices, in the cohort's order
        self.batches = batches

    def live(self, step: int) -> list[int]:
        """Positions in the cohort of the devices still taking part at `step`."""
        return [i for i, p in enumerate(self.positions) if self.task.steps[p] > step]

    def forward(self, step: int) -> Uplink:
        live = self.live(step)
        devices = [self.group.devices[i] for i in live]
        messages = self.runner.forward(self.group, live, [self.batches[k][step] for k in devices],
                                       self.task.round_index, step, [self.task.bits[self.positions[i]] for i in live])
        return Uplink(messages=messages, bits=sum(m.payload_bits for m in messages))

    def backward(self, step: int, downlink: Downlink) -> None:
        self.runner.backward(self.group, step, downlink.gradients)

    def head(self, step: int, features: Uplink) -> HeadAnswer:
        """A U-shaped split's heads on the live devices' features, each loss a share of the step's mean."""
        live = self.live(step)
        devices = [self.group.devices[i] for i in live]
        batches = [self.batches[k][step] for k in devices]
        total = sum(len(b) for b in batches)  # the step's samples: the mean is over the cohort's live devices
        grads, loss_sum, correct = self.runner.head_step(self.group, live, features.messages, batches, total,
                                                         self.task.round_index, step)
        return HeadAnswer(gradients=Uplink(messages=grads, bits=sum(g.payload_bits for g in grads)),
                          loss=loss_sum, correct=correct, samples=sum(len(b) for b in batches))


class InProcessServer:
    """The server side in this process."""

    def __init__(self, runner: ServerRunner, round_index: int, feature_bits: int = 32) -> None:
        self.runner, self.round_index = runner, round_index
        self.feature_bits = feature_bits  # a U-shaped split's features down

    def step(self, step: int, uplink: Uplink) -> Downlink:
        messages: list[Smashed] = uplink.messages
        result = self.runner.step(messages, self.round_index, step)
        return Downlink(gradients=result.gradients, loss=result.loss, correct=result.correct, samples=result.samples,
                        bits=sum(result.downlink_bits))

    def forward(self, step: int, uplink: Uplink) -> Uplink:
        """A U-shaped split: the server part's features of every device's samples, encoded down."""
        self.messages: list[Smashed] = uplink.messages
        features = self.runner.forward_features(self.messages, self.round_index, step, self.feature_bits)
        return Uplink(messages=features, bits=sum(f.payload_bits for f in features))

    def backward(self, step: int, gradients: Uplink) -> Downlink:
        """A U-shaped split: the features' gradients through the server part, the smashed data's gradients down."""
        down = self.runner.backward_features(self.messages, gradients.messages, self.round_index, step)
        return Downlink(gradients=down, loss=float("nan"), correct=0, samples=0,
                        bits=sum(g.payload_bits for g in down if g is not None))


def leakage_of(backend: Any, adapter: Adapter) -> dict[str, float] | None:
    """The monitoring attacks against an experiment's device part on the driver (its monitor built once)."""
    from sflam.privacy.monitor import LeakageMonitor  # the attacks' libraries load only in runs that ask

    if getattr(backend, "monitor", None) is None:
        backend.monitor = LeakageMonitor(backend.exp)
    return backend.monitor.measure(adapter)


def run_steps(exp: Experiment, steps: int, live: list[int], devices: CohortDevices, server: InProcessServer
              ) -> StepFigures:
    """The local steps of the experiment's split: the head on the server (`local_steps`) or on the devices."""
    if exp.config.split.head == "device":
        return u_shaped_steps(steps, live, devices, server)
    return local_steps(steps, live, devices, server)


class LocalBackend(Backend):
    """The reference runtime's backend: every device and the server part in this process."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp

    def initial_adapter(self) -> Adapter:
        return self.exp.device.initial_adapter()

    def execute(self, task: RoundTask, global_adapter: Adapter) -> RoundOutcome:
        exp = self.exp
        exp.server.set_lr_factor(task.lr_factor)
        devices = [int(k) for k in task.devices]
        batches = collated(task, exp.data.train, exp.data.pad_token_id, devices)
        group = exp.device.start(devices, global_adapter, task.lr_factor, task.fit, task.ranks, task.cuts)
        side = CohortDevices(exp.device, group, task, list(range(len(devices))), batches)
        live = [len(task.live(e)) for e in range(task.local_steps)]
        figures = run_steps(exp, task.local_steps, live, side, InProcessServer(exp.server, task.round_index,
                                                                               exp.config.quant.activation_bits))
        return RoundOutcome(weighted_sum=group.weighted_sum(task.weights),
                            total_weight=float(sum(w for w in task.weights if w > 0)), figures=figures,
                            tensor_weights=group.tensor_weights(task.weights) if task.cuts else None)

    def evaluate(self, adapter: Adapter) -> tuple[float, float]:
        return self.exp.evaluate(adapter)

    def merge_server_copies(self, adapter: Adapter, task: RoundTask) -> Adapter:
        pairs = overlap_names(self.exp.device.part, self.exp.server.part)
        merged = merge_server_copies(pairs, self.exp.server.part, adapter, task.cuts, task.weights)
        return {**adapter, **merged}

    def server_state(self) -> Adapter:
        return self.exp.server.state()

    def server_checkpoint(self) -> dict[str, Any] | None:
        return self.exp.server.checkpoint()

    def restore_server(self, state: dict[str, Any]) -> None:
        self.exp.server.restore(state)

    def leakage(self, adapter: Adapter) -> dict[str, float] | None:
        return leakage_of(self, adapter)

    def result_fields(self) -> dict[str, Any]:
        return {"device_weight_bytes": stored_weight_bytes(self.exp.device.part),
                "device_memory_bytes": self.exp.memory.total, "memory": self.exp.memory,
                "kernels": kernel_path(self.exp.config.quant.weights)}


def engine(exp: Experiment, backend: Backend | None = None) -> Engine:
    """The round engine over an experiment's planner and data (the local backend unless another is given)."""
    return Engine(exp.config, backend or LocalBackend(exp), planner=exp.planner, data=exp.data)


def run_round(exp: Experiment, round_index: int, global_adapter: Adapter) -> tuple[Adapter, RoundMetrics]:
    """One round of the reference runtime; returns the new global device adapter and the round's metrics."""
    return engine(exp).run_round(round_index, global_adapter)


def run_local(config: Any, progress: ProgressFn | None = None, experiment: Experiment | None = None,
              checkpoint: Callable[[Resume], None] | None = None, resume: Resume | None = None) -> RunResult:
    """Run every round of an experiment in this process and evaluate as configured."""
    exp = experiment or Experiment.build(config)
    return engine(exp).run(progress, checkpoint, resume)
