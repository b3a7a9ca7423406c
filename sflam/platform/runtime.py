"""The reference runtime (`runtime: local`): the round engine's in-process executor of SFL-V1 with server-side batching.

One local step, for all of the round's devices together: each device runs its part on a mini-batch of
its own data and encodes the activations; the server part runs forward/backward on all micro-batches
as one batch (mean loss), steps its optimizer and returns each device its encoded activation gradient;
each device runs backward and steps its own optimizer. Selection, plan, aggregation, evaluation and
checkpoints are the engine's (`sflam.platform.engine`), the same for every runtime.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sflam.platform import codec
from sflam.platform.build import DataBundle, build_parts, prepare_data, quiet_libraries, validate
from sflam.platform.cache import CostCache
from sflam.platform.config import ExperimentConfig
from sflam.platform.costs import DeviceMemory, FlopTable, RoundPlanner, cached_device_memory, cost_fields
from sflam.platform.data import Batch, collate, device_batches
from sflam.platform.engine import (
    Engine,
    Executor,
    ProgressFn,
    Resume,
    RoundOutcome,
    RoundTask,
    apply_plan,
    select_devices,
)
from sflam.platform.executors import Adapter, DeviceExecutor, ServerExecutor, codec_generator
from sflam.platform.quantization import kernel_path, stored_weight_bytes
from sflam.platform.results import RoundMetrics, RunResult, round_line
from sflam.platform.split import DevicePart, ServerPart
from sflam.platform.strategies import weighted_sum

EVAL_DEVICE = -2
__all__ = ["Experiment", "LocalExecutor", "apply_plan", "round_batches", "run_local", "run_round", "select_devices"]


@dataclass
class Experiment:
    """Everything a run needs, built once: config, data, and the two executors."""

    config: ExperimentConfig
    data: DataBundle
    device: DeviceExecutor
    server: ServerExecutor
    planner: RoundPlanner
    memory: DeviceMemory

    @classmethod
    def build(cls, config: ExperimentConfig) -> Experiment:
        data, device, server = build_executors(config)
        planner, memory = plan_costs(config, data, device, server)
        return cls(config, data, device, server, planner, memory)

    def evaluate(self, adapter: Adapter) -> tuple[float, float]:
        """Test accuracy and loss of the deployed pipeline: device part, activation codec, server part."""
        return summed([evaluate_batch(self.config, self.device, self.server.part, adapter, number, batch)
                       for number, batch in evaluation_batches(self.config, self.data)])


def build_executors(config: ExperimentConfig) -> tuple[DataBundle, DeviceExecutor, ServerExecutor]:
    """Data, and the device and server executors over the split model: the same in every process."""
    quiet_libraries()
    if config.threads:
        torch.set_num_threads(config.threads)
    spec = validate(config)
    data = prepare_data(config, spec)
    device_part, server_part = build_parts(config, spec, data)
    device = device_executor(config, device_part)
    return data, device, server_executor(config, server_part, send_gradients=device.trains)


def device_executor(config: ExperimentConfig, part: DevicePart) -> DeviceExecutor:
    """The device executor over an already built device part (a Ray actor gets the driver's part)."""
    q = config.quant
    return DeviceExecutor(part, q.activation_bits, q.gradient_bits, q.side_dtype, config.train.device_lr, config.seed)


def server_executor(config: ExperimentConfig, part: ServerPart, send_gradients: bool) -> ServerExecutor:
    """The server executor over an already built server part."""
    return ServerExecutor(part, config.quant.gradient_bits, codec.GRADIENT_SIDE_DTYPE, config.train.server_lr,
                          config.seed, send_gradients=send_gradients)


def evaluate_batch(config: ExperimentConfig, device: DeviceExecutor, server_part: ServerPart, adapter: Adapter,
                   number: int, batch: Batch) -> tuple[float, int, int]:
    """One evaluation batch through the deployed pipeline (device part, activation codec, server part):
    summed loss, correct predictions, samples. Every runtime evaluates a batch with this function."""
    generator = codec_generator(config.seed, 0, number, EVAL_DEVICE, 0)
    message = device.infer(adapter, batch, generator)
    with torch.no_grad():
        hidden, mask, labels = ServerExecutor.assemble([message])
        loss, correct = server_part.loss_and_correct(server_part(hidden, mask), labels)
    return float(loss) * int(labels.shape[0]), int(correct), int(labels.shape[0])


def summed(results: list[tuple[float, int, int]]) -> tuple[float, float]:
    """Accuracy and mean loss from the evaluation batches' figures, added in batch order (so every runtime,
    however it spreads the batches, gets the same floating-point sums)."""
    total_loss, correct, total = 0.0, 0, 0
    for batch_loss, batch_correct, count in results:
        total_loss, correct, total = total_loss + batch_loss, correct + batch_correct, total + count
    return correct / total, total_loss / total


def evaluation_batches(config: ExperimentConfig, data: DataBundle) -> list[tuple[int, Batch]]:
    """The test set in evaluation batches, numbered (the number seeds the codec of each batch)."""
    size = config.train.eval_batch_size
    indices = np.arange(len(data.test))
    return [(number, collate(data.test, indices[start:start + size], data.pad_token_id))
            for number, start in enumerate(range(0, len(indices), size))]


def plan_costs(config: ExperimentConfig, data: DataBundle, device: DeviceExecutor, server: ServerExecutor
               ) -> tuple[RoundPlanner, DeviceMemory]:
    """The FLOP table and device memory, measured on the real parts (or read from the on-disk cache of earlier
    measurements of the same parts, `sflam.platform.cache`), and the round planner."""
    adapter = device.initial_adapter()
    hidden = int(device.part.config.hidden_size)
    fields = cost_fields(config, device.part, server.part)
    flops = FlopTable(device.part, server.part, adapter, hidden, cache=CostCache("flops", fields))
    adapter_bits = 32 * sum(t.numel() for t in adapter.values())
    planner = RoundPlanner(config, flops, adapter_bits, trains_device=device.trains)
    if config.allocation.deadline_s is not None:  # a deadline no allocation can meet fails before any training
        selected = select_devices(config.seed, 0, config.data.num_devices, config.train.devices_per_round)
        planner.plan(0, selected, device_round_batches(config, data, 0, selected))
    # a full-length mini-batch of real training sentences: the step that needs the most activation memory
    longest = np.argsort([-len(s) for s in data.train.input_ids])[: config.train.batch_size]
    memory = cached_device_memory(config, device.part, adapter, collate(data.train, longest, data.pad_token_id),
                                  fields)
    return planner, memory


def device_round_batches(cfg: ExperimentConfig, data: DataBundle, round_index: int, devices: np.ndarray
                         ) -> dict[int, list[Batch]]:
    """Every listed device's mini-batches of a round (seeded by (seed, round, device) alone)."""
    return {int(k): [collate(data.train, idx, data.pad_token_id)
                     for idx in device_batches(data.shards[k], cfg.train.batch_size, cfg.train.local_steps,
                                               cfg.seed, round_index, int(k))] for k in devices}


def round_batches(exp: Experiment, round_index: int, selected: np.ndarray) -> dict[int, list[Batch]]:
    """Every selected device's mini-batches of the round, known before the round starts (for the plan)."""
    return device_round_batches(exp.config, exp.data, round_index, selected)


class LocalExecutor(Executor):
    """The reference runtime's executor: every device and the server part in this process. Its devices run as
    one batched cohort; `batched=False` runs them one after another (the reference the cohort is tested against)."""

    def __init__(self, exp: Experiment, batched: bool = True) -> None:
        self.exp = exp
        self.batched = batched
        self.config, self.data, self.planner = exp.config, exp.data, exp.planner

    def initial_adapter(self) -> Adapter:
        return self.exp.device.initial_adapter()

    def execute(self, task: RoundTask, global_adapter: Adapter) -> RoundOutcome:
        exp, r = self.exp, task.round_index
        exp.server.set_lr_factor(task.lr_factor)
        devices = [int(k) for k in task.devices]
        if self.batched:
            group = exp.device.start_cohort(devices, global_adapter, task.lr_factor, task.fit)
        else:
            states = [exp.device.start(k, global_adapter, task.lr_factor, task.fit) for k in devices]
        losses, correct, seen, uplink, downlink = [], 0, 0, 0, 0
        for step in range(self.config.train.local_steps):
            live = task.live(step)
            if not live:
                break
            # ---- devices: forward and encode the smashed data
            if self.batched:
                messages = exp.device.forward_cohort(group, live, [task.batches[devices[i]][step] for i in live],
                                                     r, step, [task.bits[i] for i in live])
            else:
                messages = [exp.device.forward(states[i], task.batches[devices[i]][step], r, step, task.bits[i])
                            for i in live]
            uplink += sum(m.payload_bits for m in messages)
            # ---- server: one batch over all devices, one optimizer step, encoded gradients back
            result = exp.server.step(messages, r, step)
            downlink += sum(result.downlink_bits)
            losses.append(result.loss)
            correct, seen = correct + result.correct, seen + result.samples
            # ---- devices: backward with the received gradients, local optimizer step
            if self.batched:
                exp.device.backward_cohort(group, step, result.gradients)
            else:
                for i, gradient in zip(live, result.gradients, strict=True):
                    exp.device.backward(states[i], step, gradient)
        if self.batched:
            summed = group.weighted_sum(task.weights)
        else:
            kept = [(exp.device.final_adapter(s), w) for s, w in zip(states, task.weights, strict=True) if w > 0]
            summed = weighted_sum([a for a, _ in kept], [w for _, w in kept])
        return RoundOutcome(summed, float(sum(w for w in task.weights if w > 0)), losses, correct, seen, uplink,
                            downlink)

    def evaluate(self, adapter: Adapter) -> tuple[float, float]:
        return self.exp.evaluate(adapter)

    def server_state(self) -> Adapter:
        return self.exp.server.state()

    def server_checkpoint(self) -> dict[str, Any] | None:
        return self.exp.server.checkpoint()

    def restore_server(self, state: dict[str, Any]) -> None:
        self.exp.server.restore(state)

    def result_fields(self) -> dict[str, Any]:
        return {"device_weight_bytes": stored_weight_bytes(self.exp.device.part),
                "device_memory_bytes": self.exp.memory.total, "memory": self.exp.memory,
                "kernels": kernel_path(self.config.quant.weights)}


def run_round(exp: Experiment, round_index: int, global_adapter: Adapter) -> tuple[Adapter, RoundMetrics]:
    """One round of the reference runtime; returns the new global device adapter and the round's metrics."""
    return Engine(exp.config, LocalExecutor(exp)).run_round(round_index, global_adapter)


def print_progress(metrics: RoundMetrics, total: int) -> None:
    print(round_line(metrics, total), file=sys.stderr, flush=True)


def run_local(config: ExperimentConfig, progress: ProgressFn | None = None, experiment: Experiment | None = None,
              checkpoint: Callable[[Resume], None] | None = None, resume: Resume | None = None) -> RunResult:
    """Run every round of an experiment in this process and evaluate as configured."""
    exp = experiment or Experiment.build(config)
    return Engine(config, LocalExecutor(exp)).run(progress, checkpoint, resume)
