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

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from sflam.platform.build import build_parts, prepare_data, quiet_libraries, validate
from sflam.platform.cache import CostCache
from sflam.platform.config import ExperimentConfig, config_from_dict
from sflam.platform.costs import FlopTable, RoundPlanner, cached_device_memory, cost_fields
from sflam.platform.data import collate
from sflam.platform.engine import Engine, Executor, Resume, RoundOutcome, RoundTask
from sflam.platform.executors import Adapter, trainable_state
from sflam.platform.quantization import kernel_path, stored_weight_bytes
from sflam.platform.results import RoundMetrics, RunResult
from sflam.platform.runtime import Experiment, LocalExecutor, evaluation_batches
from sflam.platform.strategies import weighted_sum

METHODS = ("fl", "sl", "sfl", "sfl-q", "sflam")
ProgressFn = Callable[[RoundMetrics], None]
Checkpoint = Callable[[Resume], None]


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


# --------------------------------------------------------------------------- the planners of fl and sl


def build_planner(method: str, config: ExperimentConfig, flops: FlopTable, adapter_bits: int,
                  trains_device: bool) -> RoundPlanner:
    """The one place a method gets its round planner: the cost model under the method's schedule.

    sfl, sfl-q and sflam run the lockstep split; fl trains the whole model on every device in parallel
    (only adapters travel); sl runs the devices one after another, each alone on the whole band.
    """
    schedule = {"fl": "parallel", "sl": "sequential"}.get(method, "lockstep")
    return RoundPlanner(config, flops, adapter_bits, trains_device=trains_device, schedule=schedule)


class WholeModel(nn.Module):
    """Device part at cut L and the server part's norm and head: the whole model on one device."""

    def __init__(self, device_part: nn.Module, server_part: nn.Module) -> None:
        super().__init__()
        self.device_part = device_part
        self.server_part = server_part

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.server_part(self.device_part(input_ids, attention_mask), attention_mask)


class LocalTrainingExecutor(Executor):
    """fl: every device trains the whole model (LoRA everywhere, the head too) on its own batches."""

    def __init__(self, config: ExperimentConfig) -> None:
        quiet_libraries()
        spec = validate(config)
        self.config = config
        self.data = prepare_data(config, spec)
        whole_cut = config_from_dict({**config.to_dict(), "split": {"cut_layer": spec.num_layers}})
        device_part, self.server_part = build_parts(whole_cut, spec, self.data)
        self.model = WholeModel(device_part, self.server_part)
        self.initial = trainable_state(self.model)
        self.adapter_bits = 32 * sum(t.numel() for t in self.initial.values())
        fields = {**cost_fields(whole_cut, self.model), "method": "fl"}
        flops = FlopTable(self.model, nn.Identity(), self.initial, int(device_part.config.hidden_size),
                          cache=CostCache("flops", fields))
        longest = np.argsort([-len(s) for s in self.data.train.input_ids])[: config.train.batch_size]
        self.memory = cached_device_memory(config, self.model, self.initial,
                                           collate(self.data.train, longest, self.data.pad_token_id), fields)
        self.planner = build_planner("fl", config, flops, self.adapter_bits, True)

    def initial_adapter(self) -> Adapter:
        return {n: t.clone() for n, t in self.initial.items()}

    def execute(self, task: RoundTask, global_adapter: Adapter) -> RoundOutcome:
        lr = self.config.train.device_lr * task.lr_factor
        finals, weights, losses, correct, seen = [], [], [], 0, 0
        for i, k in enumerate(task.devices):
            adapter = {n: t.detach().clone().requires_grad_(not task.fit.is_frozen(n))
                       for n, t in global_adapter.items()}
            trained = [t for t in adapter.values() if t.requires_grad]
            optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
            for batch in task.batches[int(k)][:task.steps[i]]:
                with torch.enable_grad():
                    logits = torch.func.functional_call(self.model, adapter, (batch.input_ids, batch.attention_mask),
                                                        strict=False)
                    batch_loss, batch_correct = self.server_part.loss_and_correct(logits, batch.labels)
                    batch_loss.backward()
                if task.fit.proximal_mu > 0:  # FedProx: + mu (w - w_global)
                    with torch.no_grad():
                        for n, t in adapter.items():
                            if t.grad is not None:
                                t.grad += task.fit.proximal_mu * (t - global_adapter[n])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(batch_loss.detach()))
                correct, seen = correct + int(batch_correct), seen + len(batch)
            if task.weights[i] > 0:
                finals.append({n: t.detach().clone() for n, t in adapter.items()})
                weights.append(task.weights[i])
        # only the adapters travel: each device's global adapter down, the finished ones' up
        return RoundOutcome(weighted_sum(finals, weights), float(sum(weights)), losses, correct, seen,
                            self.adapter_bits * len(finals), self.adapter_bits * len(task.devices))

    @torch.no_grad()
    def evaluate(self, adapter: Adapter) -> tuple[float, float]:
        total_loss, correct, total = 0.0, 0, 0
        for _, batch in evaluation_batches(self.config, self.data):
            logits = torch.func.functional_call(self.model, adapter, (batch.input_ids, batch.attention_mask),
                                                strict=False)
            batch_loss, batch_correct = self.server_part.loss_and_correct(logits, batch.labels)
            total_loss += float(batch_loss) * len(batch)
            correct, total = correct + int(batch_correct), total + len(batch)
        return correct / total, total_loss / total

    def result_fields(self) -> dict[str, Any]:
        return {"device_weight_bytes": stored_weight_bytes(self.model), "device_memory_bytes": self.memory.total,
                "memory": self.memory, "kernels": kernel_path(self.config.quant.weights)}


def run_fl(config: ExperimentConfig, progress: ProgressFn | None = None, announce=None,
           checkpoint: Checkpoint | None = None, resume: Resume | None = None) -> RunResult:
    return Engine(config, LocalTrainingExecutor(config)).run(progress, checkpoint, resume)


# --------------------------------------------------------------------------- SL


class SequentialExecutor(LocalExecutor):
    """sl: the round's devices one after another, each training the device part for its steps against the
    server and handing its adapter to the next; a device that drops out hands on nothing."""

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__(Experiment.build(config))
        base = self.exp.planner  # the FLOP table measured once on the real parts
        self.planner = build_planner("sl", config, base.flops, base.adapter_bits, self.exp.device.trains)

    def execute(self, task: RoundTask, global_adapter: Adapter) -> RoundOutcome:
        exp, r = self.exp, task.round_index
        exp.server.set_lr_factor(task.lr_factor)
        adapter = global_adapter
        losses, correct, seen, uplink, downlink = [], 0, 0, 0, 0
        for i, k in enumerate(task.devices):
            state = exp.device.start(int(k), adapter, task.lr_factor, task.fit)
            for step, batch in enumerate(task.batches[int(k)][:task.steps[i]]):
                message = exp.device.forward(state, batch, r, step, task.bits[i])
                result = exp.server.step([message], r, step)
                exp.device.backward(state, step, result.gradients[0])
                losses.append(result.loss)
                correct, seen = correct + result.correct, seen + result.samples
                uplink += message.payload_bits
                downlink += sum(result.downlink_bits)
            if task.weights[i] > 0:
                adapter = exp.device.final_adapter(state)
        # the chain's last adapter is the round's result (weight 1: nothing to average)
        return RoundOutcome(adapter, 1.0, losses, correct, seen, uplink, downlink)


def run_sl(config: ExperimentConfig, progress: ProgressFn | None = None, announce=None,
           checkpoint: Checkpoint | None = None, resume: Resume | None = None) -> RunResult:
    return Engine(config, SequentialExecutor(config)).run(progress, checkpoint, resume)


RUNNERS: dict[str, Callable[..., RunResult]] = {"fl": run_fl, "sl": run_sl}
