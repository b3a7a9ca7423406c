"""The reference runtime (`runtime: local`): rounds of SFL-V1 with server-side batching, one process.

Each round: sample K of N devices; every selected device starts from the global device adapter and
runs E local steps. One local step, for all selected devices together: each device runs its part on a
mini-batch of its own data and encodes the activations; the server part runs forward/backward on all
micro-batches as one batch (mean loss), steps its optimizer and returns each device its encoded
activation gradient; each device runs backward and steps its own optimizer. After E steps the device
adapters are averaged, weighted by sample count (FedAvg). Evaluation every `eval_every` rounds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sflam.platform import codec
from sflam.platform.build import DataBundle, build_parts, prepare_data, quiet_libraries, validate
from sflam.platform.config import ExperimentConfig
from sflam.platform.costs import DeviceMemory, FlopTable, RoundPlan, RoundPlanner, measure_device_memory
from sflam.platform.data import Batch, collate, device_batches
from sflam.platform.executors import Adapter, DeviceExecutor, ServerExecutor, codec_generator, fedavg
from sflam.platform.quantization import stored_weight_bytes
from sflam.platform.results import RoundMetrics, RunResult, round_line

ProgressFn = Callable[[RoundMetrics], None]
EVAL_DEVICE = -2


def select_devices(seed: int, round_index: int, num_devices: int, per_round: int) -> np.ndarray:
    """The K devices of a round, seeded by (seed, round) alone."""
    rng = np.random.default_rng([seed, round_index, 7])
    return np.sort(rng.choice(num_devices, size=per_round, replace=False))


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
        total_loss, correct, total = 0.0, 0, 0
        for number, batch in evaluation_batches(self.config, self.data):
            generator = codec_generator(self.config.seed, 0, number, EVAL_DEVICE, 0)
            message = self.device.infer(adapter, batch, generator)
            batch_loss, batch_correct, count = self.server.evaluate([message])
            total_loss, correct, total = total_loss + batch_loss, correct + batch_correct, total + count
        return correct / total, total_loss / total


def build_executors(config: ExperimentConfig) -> tuple[DataBundle, DeviceExecutor, ServerExecutor]:
    """Data, and the device and server executors over the split model: the same in every process."""
    quiet_libraries()
    if config.threads:
        torch.set_num_threads(config.threads)
    spec = validate(config)
    data = prepare_data(config, spec)
    device_part, server_part = build_parts(config, spec, data)
    q = config.quant
    device = DeviceExecutor(device_part, q.activation_bits, q.gradient_bits, q.side_dtype,
                            config.train.device_lr, config.seed)
    server = ServerExecutor(server_part, q.gradient_bits, codec.GRADIENT_SIDE_DTYPE, config.train.server_lr,
                            config.seed, send_gradients=device.trains)
    return data, device, server


def evaluation_batches(config: ExperimentConfig, data: DataBundle) -> list[tuple[int, Batch]]:
    """The test set in evaluation batches, numbered (the number seeds the codec of each batch)."""
    size = config.train.eval_batch_size
    indices = np.arange(len(data.test))
    return [(number, collate(data.test, indices[start:start + size], data.pad_token_id))
            for number, start in enumerate(range(0, len(indices), size))]


def plan_costs(config: ExperimentConfig, data: DataBundle, device: DeviceExecutor, server: ServerExecutor
               ) -> tuple[RoundPlanner, DeviceMemory]:
    """The FLOP table and device memory, measured once on the real parts, and the round planner."""
    adapter = device.initial_adapter()
    hidden = int(device.part.config.hidden_size)
    flops = FlopTable(device.part, server.part, adapter, hidden)
    adapter_bits = 32 * sum(t.numel() for t in adapter.values())
    planner = RoundPlanner(config, flops, adapter_bits, trains_device=device.trains)
    if config.allocation.deadline_s is not None:  # a deadline no allocation can meet fails before any training
        selected = select_devices(config.seed, 0, config.data.num_devices, config.train.devices_per_round)
        planner.plan(0, selected, device_round_batches(config, data, 0, selected))
    # a full-length mini-batch of real training sentences: the step that needs the most activation memory
    longest = np.argsort([-len(s) for s in data.train.input_ids])[: config.train.batch_size]
    memory = measure_device_memory(device.part, adapter, collate(data.train, longest, data.pad_token_id))
    return planner, memory


def round_batches(exp: Experiment, round_index: int, selected: np.ndarray) -> dict[int, list[Batch]]:
    """Every selected device's mini-batches of the round, known before the round starts (for the plan)."""
    return device_round_batches(exp.config, exp.data, round_index, selected)


def device_round_batches(cfg: ExperimentConfig, data: DataBundle, round_index: int, devices: np.ndarray
                         ) -> dict[int, list[Batch]]:
    return {int(k): [collate(data.train, idx, data.pad_token_id)
                     for idx in device_batches(data.shards[k], cfg.train.batch_size, cfg.train.local_steps,
                                               cfg.seed, round_index, int(k))] for k in devices}


def apply_plan(metrics: RoundMetrics, plan: RoundPlan) -> RoundMetrics:
    for key, value in plan.metrics().items():
        setattr(metrics, key, value)
    metrics.plan = plan
    return metrics


def run_round(exp: Experiment, round_index: int, global_adapter: Adapter) -> tuple[Adapter, RoundMetrics]:
    """One round of the reference runtime; returns the new global device adapter and the round's metrics."""
    cfg = exp.config
    started = time.perf_counter()
    selected = select_devices(cfg.seed, round_index, cfg.data.num_devices, cfg.train.devices_per_round)
    lr_factor = cfg.train.lr_factor(round_index)
    exp.server.set_lr_factor(lr_factor)
    batches = round_batches(exp, round_index, selected)
    # ---- plan: bits, power and bandwidth per device from the channels and the exact payloads
    plan = exp.planner.plan(round_index, selected, batches)
    states = [exp.device.start(int(k), global_adapter, lr_factor) for k in selected]
    losses, correct, seen, uplink, downlink = [], 0, 0, 0, 0
    bits = [int(q) for q in plan.allocation.bits]  # in the order of `selected`, as the states
    for step in range(cfg.train.local_steps):
        # ---- devices: forward and encode the smashed data
        messages = [exp.device.forward(state, batches[state.device][step], round_index, step, q)
                    for state, q in zip(states, bits, strict=True)]
        uplink += sum(m.payload_bits for m in messages)
        # ---- server: one batch over all devices, one optimizer step, encoded gradients back
        result = exp.server.step(messages, round_index, step)
        downlink += sum(result.downlink_bits)
        losses.append(result.loss)
        correct, seen = correct + result.correct, seen + result.samples
        # ---- devices: backward with the received gradients, local optimizer step
        for state, gradient in zip(states, result.gradients, strict=True):
            exp.device.backward(state, step, gradient)
    # ---- aggregation: FedAvg weighted by the devices' sample counts
    weights = [float(len(exp.data.shards[state.device])) for state in states]
    new_global = fedavg([exp.device.final_adapter(state) for state in states], weights)
    metrics = RoundMetrics(round=round_index + 1, train_loss=float(np.mean(losses)), train_accuracy=correct / seen,
                           samples=seen, uplink_bits=uplink, downlink_bits=downlink,
                           wall_s=time.perf_counter() - started, step_losses=[float(v) for v in losses])
    return new_global, apply_plan(metrics, plan)


def print_progress(metrics: RoundMetrics, total: int) -> None:
    print(round_line(metrics, total), file=sys.stderr, flush=True)


def run_local(config: ExperimentConfig, progress: ProgressFn | None = None,
              experiment: Experiment | None = None) -> RunResult:
    """Run every round of an experiment in this process and evaluate as configured."""
    started = time.perf_counter()
    exp = experiment or Experiment.build(config)
    global_adapter = exp.device.initial_adapter()
    rounds: list[RoundMetrics] = []
    accuracy, loss = float("nan"), float("nan")
    total = config.train.rounds
    for round_index in range(total):
        global_adapter, metrics = run_round(exp, round_index, global_adapter)
        last = round_index == total - 1
        if (round_index + 1) % config.train.eval_every == 0 or last:
            eval_started = time.perf_counter()
            accuracy, loss = exp.evaluate(global_adapter)
            metrics.eval_accuracy, metrics.eval_loss = accuracy, loss
            metrics.wall_s += time.perf_counter() - eval_started
        rounds.append(metrics)
        if progress is not None:
            progress(metrics)
    return RunResult(
        config=config.to_flat(), rounds=rounds, accuracy=accuracy, loss=loss,
        wall_s=time.perf_counter() - started, devices=config.data.num_devices,
        devices_per_round=config.train.devices_per_round,
        device_weight_bytes=stored_weight_bytes(exp.device.part),
        device_adapter=global_adapter, server_state=exp.server.state(),
        device_memory_bytes=exp.memory.total, memory=exp.memory,
    )
