"""The baselines of DESIGN §5 on the same data, devices, channels and seeds as SFLAM.

fl      federated learning: the whole model on every device (fp32 weights, LoRA on every block, the head
        trained too), E local steps on the device's own data, FedAvg of adapters and head; only the
        adapters travel (equal bandwidth, full power), no smashed data.
sl      vanilla split learning: the selected devices one after another, each training the device part
        for E steps against the server and handing its adapter to the next (fp32 weights and activations);
        each device has the whole band while it transmits, so the round takes the sum of their times.
sfl     split federated learning with fp32 weights and activations, equal bandwidth, full power.
sfl-q   the same split, quantized as configured, equal allocation.
sflam   quantized and allocated (bits, power, bandwidth).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from sflam.platform.build import build_parts, prepare_data, quiet_libraries, validate
from sflam.platform.config import ExperimentConfig, config_from_dict
from sflam.platform.costs import FlopTable, RoundPlanner, measure_device_memory
from sflam.platform.data import collate
from sflam.platform.executors import Adapter, fedavg, trainable_state
from sflam.platform.quantization import stored_weight_bytes
from sflam.platform.results import RoundMetrics, RunResult
from sflam.platform.runtime import (
    Experiment,
    apply_plan,
    device_round_batches,
    evaluation_batches,
    select_devices,
)

METHODS = ("fl", "sl", "sfl", "sfl-q", "sflam")
ProgressFn = Callable[[RoundMetrics], None]


def method_config(config: ExperimentConfig, method: str) -> ExperimentConfig:
    """The configuration each method runs with; everything else (data, devices, channels, seeds) is shared."""
    tree = config.to_dict()
    tree["name"] = f"{config.name}-{method}"
    if method in ("fl", "sl", "sfl"):
        tree["quant"] = {**tree["quant"], "weights": "fp32", "activation_bits": 32, "gradient_bits": 32}
    if method in ("fl", "sl", "sfl", "sfl-q"):
        tree["allocation"] = {**tree["allocation"], "policy": "equal"}
    if method == "sflam":
        tree["allocation"] = {**tree["allocation"], "policy": "sflam"}
    if method in ("fl", "sl"):
        tree["runtime"] = "local"  # the baselines run in the reference process
    return config_from_dict(tree)


def _finish_round(config: ExperimentConfig, round_index: int, metrics: RoundMetrics, round_started: float,
                  rounds: list[RoundMetrics], progress: ProgressFn | None,
                  evaluate: Callable[[], tuple[float, float]]) -> tuple[float, float] | None:
    """Evaluate when due, time the round, keep it and report it; returns (accuracy, loss) when evaluated."""
    evaluated = None
    if (round_index + 1) % config.train.eval_every == 0 or round_index == config.train.rounds - 1:
        evaluated = evaluate()
        metrics.eval_accuracy, metrics.eval_loss = evaluated
    metrics.wall_s = time.perf_counter() - round_started
    rounds.append(metrics)
    if progress is not None:
        progress(metrics)
    return evaluated


# --------------------------------------------------------------------------- FL


class WholeModel(nn.Module):
    """Device part at cut L and the server part's norm and head: the whole model on one device."""

    def __init__(self, device_part: nn.Module, server_part: nn.Module) -> None:
        super().__init__()
        self.device_part = device_part
        self.server_part = server_part

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.server_part(self.device_part(input_ids, attention_mask), attention_mask)


def run_fl(config: ExperimentConfig, progress: ProgressFn | None = None, announce=None) -> RunResult:
    started = time.perf_counter()
    quiet_libraries()
    spec = validate(config)
    data = prepare_data(config, spec)
    whole_cut = config_from_dict({**config.to_dict(), "split": {"cut_layer": spec.num_layers}})
    device_part, server_part = build_parts(whole_cut, spec, data)
    model = WholeModel(device_part, server_part)
    global_adapter = trainable_state(model)
    adapter_bits = 32 * sum(t.numel() for t in global_adapter.values())
    flops = FlopTable(model, nn.Identity(), global_adapter, int(device_part.config.hidden_size))
    longest = np.argsort([-len(s) for s in data.train.input_ids])[: config.train.batch_size]
    memory = measure_device_memory(model, global_adapter, collate(data.train, longest, data.pad_token_id))
    planner = RoundPlanner(config, flops, adapter_bits, trains_device=True, schedule="parallel")
    rounds: list[RoundMetrics] = []
    accuracy, loss = float("nan"), float("nan")
    for round_index in range(config.train.rounds):
        round_started = time.perf_counter()
        selected = select_devices(config.seed, round_index, config.data.num_devices, config.train.devices_per_round)
        batches = device_round_batches(config, data, round_index, selected)
        lr = config.train.device_lr * config.train.lr_factor(round_index)
        finals, weights, losses, correct, seen = [], [], [], 0, 0
        for k in selected:
            adapter = {n: t.detach().clone().requires_grad_(True) for n, t in global_adapter.items()}
            optimizer = torch.optim.AdamW(adapter.values(), lr=lr, weight_decay=0.0)
            for batch in batches[int(k)]:
                with torch.enable_grad():
                    logits = torch.func.functional_call(model, adapter, (batch.input_ids, batch.attention_mask),
                                                        strict=False)
                    batch_loss, batch_correct = server_part.loss_and_correct(logits, batch.labels)
                    batch_loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(batch_loss.detach()))
                correct, seen = correct + int(batch_correct), seen + len(batch)
            finals.append({n: t.detach().clone() for n, t in adapter.items()})
            weights.append(float(len(data.shards[k])))
        global_adapter = fedavg(finals, weights)
        # ---- costs: local compute, the adapter (and head) down and up at equal bandwidth, full power
        plan = planner.plan(round_index, selected, batches)
        up = np.full(len(selected), adapter_bits)
        metrics = RoundMetrics(round=round_index + 1, train_loss=float(np.mean(losses)), train_accuracy=correct / seen,
                               samples=seen, uplink_bits=int(up.sum()), downlink_bits=int(up.sum()),
                               wall_s=0.0)
        apply_plan(metrics, plan)
        evaluated = _finish_round(config, round_index, metrics, round_started, rounds, progress,
                                  partial(_evaluate_whole, config, data, model, server_part, global_adapter))
        accuracy, loss = evaluated or (accuracy, loss)
    return RunResult(config=config.to_flat(), rounds=rounds, accuracy=accuracy, loss=loss,
                     wall_s=time.perf_counter() - started, devices=config.data.num_devices,
                     devices_per_round=config.train.devices_per_round, device_weight_bytes=stored_weight_bytes(model),
                     device_adapter=global_adapter, server_state={}, device_memory_bytes=memory.total, memory=memory)


@torch.no_grad()
def _evaluate_whole(config: ExperimentConfig, data, model: nn.Module, server_part, adapter: Adapter
                    ) -> tuple[float, float]:
    total_loss, correct, total = 0.0, 0, 0
    for _, batch in evaluation_batches(config, data):
        logits = torch.func.functional_call(model, adapter, (batch.input_ids, batch.attention_mask), strict=False)
        batch_loss, batch_correct = server_part.loss_and_correct(logits, batch.labels)
        total_loss += float(batch_loss) * len(batch)
        correct, total = correct + int(batch_correct), total + len(batch)
    return correct / total, total_loss / total


# --------------------------------------------------------------------------- SL


def run_sl(config: ExperimentConfig, progress: ProgressFn | None = None, announce=None) -> RunResult:
    started = time.perf_counter()
    exp = Experiment.build(config)
    p = exp.planner
    sequential = RoundPlanner(config, p.flops, p.adapter_bits, p.trains_device, schedule="sequential")
    adapter = exp.device.initial_adapter()
    rounds: list[RoundMetrics] = []
    accuracy, loss = float("nan"), float("nan")
    for round_index in range(config.train.rounds):
        round_started = time.perf_counter()
        selected = select_devices(config.seed, round_index, config.data.num_devices, config.train.devices_per_round)
        lr = config.train.lr_factor(round_index)
        exp.server.set_lr_factor(lr)
        batches = device_round_batches(config, exp.data, round_index, selected)
        losses, correct, seen, uplink, downlink = [], 0, 0, 0, 0
        for k in selected:  # one device after another, each handing its adapter to the next
            state = exp.device.start(int(k), adapter, lr)
            for step, batch in enumerate(batches[int(k)]):
                message = exp.device.forward(state, batch, round_index, step, 32)
                result = exp.server.step([message], round_index, step)
                exp.device.backward(state, step, result.gradients[0])
                losses.append(result.loss)
                correct, seen = correct + result.correct, seen + result.samples
                uplink += message.payload_bits
                downlink += sum(result.downlink_bits)
            adapter = exp.device.final_adapter(state)
        metrics = RoundMetrics(round=round_index + 1, train_loss=float(np.mean(losses)), train_accuracy=correct / seen,
                               samples=seen, uplink_bits=uplink, downlink_bits=downlink, wall_s=0.0)
        # ---- costs: each device alone with the server on the whole band, one after another
        apply_plan(metrics, sequential.plan(round_index, selected, batches))
        evaluated = _finish_round(config, round_index, metrics, round_started, rounds, progress,
                                  partial(exp.evaluate, adapter))
        accuracy, loss = evaluated or (accuracy, loss)
    return RunResult(config=config.to_flat(), rounds=rounds, accuracy=accuracy, loss=loss,
                     wall_s=time.perf_counter() - started, devices=config.data.num_devices,
                     devices_per_round=config.train.devices_per_round,
                     device_weight_bytes=stored_weight_bytes(exp.device.part), device_adapter=adapter,
                     server_state=exp.server.state(), device_memory_bytes=exp.memory.total, memory=exp.memory)


RUNNERS: dict[str, Callable[..., RunResult]] = {"fl": run_fl, "sl": run_sl}
