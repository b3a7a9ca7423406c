"""The baselines of docs/concepts/round-engine.md on the same data, devices, channels and seeds as SFLAM.

fl      federated learning: the whole model on every device (fp32 weights, LoRA on every block, the head
        trained too), E local steps on the device's own data, FedAvg of adapters and head; only the
        adapters travel (equal bandwidth, full power), no smashed data.
sl      vanilla split learning: the selected devices one after another, each training the device part
        for E steps against the server and handing its adapter to the next (fp32 weights and activations);
        each device has the whole band while it transmits, so the round takes the sum of their times.
sfl     split federated learning (SFL-V1) with fp32 weights and activations, equal bandwidth, full power.
sfl-v2  SFL-V2: the devices train in parallel from the global adapter (as sfl), but one server part serves them
        one after another, each device's steps updating it before the next device's; device adapters are
        averaged as in sfl. fp32, equal bandwidth, full power; a device waits while the server serves others.
sfl-q   the same split, quantized as configured, equal allocation.
sflam   quantized and allocated (bits, power, bandwidth).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sflam.platform.assembly import (
    Experiment,
    build_runners,
    evaluate_batch,
    evaluation_batches,
    longest_batch,
    summed,
)
from sflam.platform.build import validate
from sflam.platform.cache import CostCache, cost_fields
from sflam.platform.config import ExperimentConfig, config_from_dict
from sflam.platform.data import Batch
from sflam.platform.engine import Backend, Engine, RoundOutcome, RoundTask
from sflam.platform.errors import ConfigError
from sflam.platform.flops import FlopTable
from sflam.platform.local import CohortDevices, InProcessServer, LocalBackend, collated, run_steps
from sflam.platform.memory import cached_device_memory
from sflam.platform.planner import RoundPlanner
from sflam.platform.protocol import Downlink, StepFigures, whole_model_steps
from sflam.platform.quantization import kernel_path, stored_weight_bytes
from sflam.platform.results import Resume, RoundMetrics, RunResult
from sflam.platform.split import DevicePart, ServerPart
from sflam.platform.strategies import Adapter, FitInstructions, local_step, trainable_state

METHODS = ("fl", "sl", "sfl", "sfl-v2", "sfl-q", "sflam")
SCHEDULE_OF = {"fl": "parallel", "sl": "sequential", "sfl-v2": "server-sequential"}  # the others: lockstep
ProgressFn = Callable[[RoundMetrics], None]
Checkpoint = Callable[[Resume], None]


def method_config(config: ExperimentConfig, method: str) -> ExperimentConfig:
    """The configuration each method runs with; everything else (data, devices, channels, seeds) is shared."""
    if method in ("fl", "sl") and config.lora.rank_policy != "fixed":
        # fl trains whole models and sl hands one adapter down a chain: ranks per class are the split federated
        # methods' (sfl, sfl-v2, sfl-q, sflam)
        raise ConfigError("lora.rank_policy", config.lora.rank_policy, f"fixed with method {method} (LoRA ranks per "
                          "class run with sfl, sfl-v2, sfl-q and sflam)")
    if method in ("fl", "sl", "sfl-v2") and config.split.mixed:
        # fl has no cut; sl and sfl-v2 serve one device at a time, priced at one cut
        raise ConfigError("split.policy", config.split.policy, f"fixed with method {method} (devices at several "
                          "cuts run with sfl, sfl-q and sflam)")
    tree = config.to_dict()
    tree["name"] = f"{config.name}-{method}"
    if method in ("fl", "sl", "sfl", "sfl-v2"):
        tree["quant"] = {**tree["quant"], "weights": "fp32", "activation_bits": 32, "gradient_bits": 32}
    if method in ("fl", "sl", "sfl", "sfl-v2", "sfl-q"):
        tree["allocation"] = {**tree["allocation"], "policy": "equal"}
    if method == "sflam":
        tree["allocation"] = {**tree["allocation"], "policy": "sflam"}
    if method in ("fl", "sl", "sfl-v2"):
        tree["runtime"] = "local"  # the baselines run in the reference process
    return config_from_dict(tree)


# --------------------------------------------------------------------------- the planners of fl and sl


def build_planner(method: str, config: ExperimentConfig, flops: FlopTable, adapter_bits: int,
                  trains_device: bool) -> RoundPlanner:
    """The one place a method gets its round planner: the cost model under the method's schedule.

    sfl, sfl-q and sflam run the lockstep split; fl trains the whole model on every device in parallel
    (only adapters travel); sl runs the devices one after another, each alone on the whole band; sfl-v2 runs
    them in parallel on their shares of the band while the server serves one device after another.
    """
    schedule = SCHEDULE_OF.get(method, "lockstep")
    return RoundPlanner(config, flops, adapter_bits, trains_device=trains_device, schedule=schedule)


class WholeModel(nn.Module):
    """Device part at cut L and the server part's norm and head: the whole model on one device."""

    def __init__(self, device_part: DevicePart, server_part: ServerPart) -> None:
        super().__init__()
        self.device_part = device_part
        self.server_part = server_part

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.server_part(self.device_part(input_ids, attention_mask), attention_mask)


# --------------------------------------------------------------------------- fl


class WholeModelDevices:
    """fl's device side: each live device trains the whole model (LoRA everywhere, the head too) on its own loss,
    one device after another (their computations are independent)."""

    def __init__(self, model: WholeModel, task: RoundTask, batches: dict[int, list[Batch]], global_adapter: Adapter,
                 lr: float) -> None:
        self.model, self.task, self.batches = model, task, batches
        self.devices = [int(k) for k in task.devices]
        fit: FitInstructions = task.fit
        self.anchor = global_adapter if fit.proximal_mu > 0 else None
        self.adapters = [{n: t.detach().clone().requires_grad_(not fit.is_frozen(n)) for n, t in global_adapter.items()}
                         for _ in self.devices]
        self.optimizers = [torch.optim.AdamW([t for t in a.values() if t.requires_grad], lr=lr, weight_decay=0.0)
                           for a in self.adapters]

    def train(self, step: int) -> Downlink:
        loss_sum, correct, samples = 0.0, 0, 0
        for i in self.task.live(step):
            batch = self.batches[self.devices[i]][step]
            with torch.enable_grad():
                inputs = (batch.input_ids, batch.attention_mask)
                logits = torch.func.functional_call(self.model, self.adapters[i], inputs, strict=False)
                loss, hits = self.model.server_part.loss_and_correct(logits, batch.labels)
                loss.backward()
            local_step(self.adapters[i], self.optimizers[i], self.anchor, self.task.fit.proximal_mu)
            loss_sum += float(loss.detach()) * len(batch)
            correct, samples = correct + int(hits), samples + len(batch)
        # the step's mean loss over every sample, as a server would report it; nothing crosses the link
        return Downlink(gradients=None, loss=loss_sum / samples, correct=correct, samples=samples, bits=0)

    def weighted_sum(self, weights: list[float]) -> tuple[Adapter, float]:
        kept = [i for i, w in enumerate(weights) if w > 0]
        if not kept:
            return {}, 0.0
        return ({name: torch.stack([weights[i] * self.adapters[i][name].detach().double() for i in kept]).sum(0)
                 for name in self.adapters[0]}, float(sum(weights[i] for i in kept)))


class WholeModelBackend(Backend):
    """fl: every device trains the whole model on its own batches; only the adapters and the head travel."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        whole = config_from_dict({**config.to_dict(), "split": {"cut_layer": validate(config).num_layers}})
        self.data, self.device, self.server = build_runners(whole)
        self.model = WholeModel(self.device.part, self.server.part)
        self.initial = trainable_state(self.model)
        self.adapter_bits = 32 * sum(t.numel() for t in self.initial.values())
        fields = {**cost_fields(whole, self.model), "method": "fl"}
        flops = FlopTable(self.model, nn.Identity(), self.initial, int(self.device.part.config.hidden_size),
                          cache=CostCache("flops", fields))
        self.memory = cached_device_memory(config, self.model, self.initial, longest_batch(config, self.data), fields)
        self.planner = build_planner("fl", config, flops, self.adapter_bits, True)

    def initial_adapter(self) -> Adapter:
        return {n: t.clone() for n, t in self.initial.items()}

    def execute(self, task: RoundTask, global_adapter: Adapter) -> RoundOutcome:
        devices = [int(k) for k in task.devices]
        batches = collated(task, self.data.train, self.data.pad_token_id, devices)
        lr = self.config.train.device_lr * task.lr_factor
        side = WholeModelDevices(self.model, task, batches, global_adapter, lr)
        figures = whole_model_steps(task.local_steps, [len(task.live(e)) for e in range(task.local_steps)], side)
        weighted, total = side.weighted_sum(task.weights)
        # only the adapters travel: each device's global adapter down, the finished ones' up
        figures.uplink_bits += self.adapter_bits * sum(w > 0 for w in task.weights)
        figures.downlink_bits += self.adapter_bits * len(devices)
        return RoundOutcome(weighted_sum=weighted, total_weight=total, figures=figures)

    def evaluate(self, adapter: Adapter) -> tuple[float, float]:
        """The one evaluation of the deployed pipeline (`assembly.evaluate_batch`): the device part with its
        adapter, a lossless codec (fl's smashed data never leaves the device), the head with its trained tensors."""
        device_adapter = {n.removeprefix("device_part."): t for n, t in adapter.items() if n.startswith("device_part.")}
        with torch.no_grad():
            for name, param in self.server.part.named_parameters():
                if f"server_part.{name}" in adapter:
                    param.copy_(adapter[f"server_part.{name}"])
        return summed([evaluate_batch(self.config, self.device, self.server.part, device_adapter, number, batch)
                       for number, batch in evaluation_batches(self.config, self.data)])

    def result_fields(self) -> dict[str, Any]:
        return {"device_weight_bytes": stored_weight_bytes(self.model), "device_memory_bytes": self.memory.total,
                "memory": self.memory, "kernels": kernel_path(self.config.quant.weights),
                "privacy": {"labels_sent": False}}  # the whole model and its loss stay on the device


def run_fl(config: ExperimentConfig, progress: ProgressFn | None = None, announce: Any = None,
           checkpoint: Checkpoint | None = None, resume: Resume | None = None) -> RunResult:
    backend = WholeModelBackend(config)
    return Engine(config, backend, planner=backend.planner, data=backend.data).run(progress, checkpoint, resume)


# --------------------------------------------------------------------------- sl


class SequentialBackend(LocalBackend):
    """sl: the round's devices one after another, each a cohort of one training the device part for its steps
    against the server and handing its adapter to the next; a device that drops out hands on nothing."""

    def execute(self, task: RoundTask, global_adapter: Adapter) -> RoundOutcome:
        exp = self.exp
        exp.server.set_lr_factor(task.lr_factor)
        devices = [int(k) for k in task.devices]
        batches = collated(task, exp.data.train, exp.data.pad_token_id, devices)
        adapter = global_adapter
        figures = StepFigures()
        for i, k in enumerate(devices):
            group = exp.device.start([k], adapter, task.lr_factor, task.fit)
            side = CohortDevices(exp.device, group, task, [i], batches)
            figures.extend(run_steps(exp, task.steps[i], [1] * task.steps[i], side,
                                     InProcessServer(exp.server, task.round_index, exp.config.quant.activation_bits)))
            if task.weights[i] > 0:
                adapter = group.adapter_of(0)
        # the chain's last adapter is the round's result (weight 1: nothing to average)
        return RoundOutcome(weighted_sum=adapter, total_weight=1.0, figures=figures)


def run_sl(config: ExperimentConfig, progress: ProgressFn | None = None, announce: Any = None,
           checkpoint: Checkpoint | None = None, resume: Resume | None = None) -> RunResult:
    exp = Experiment.build(config, schedule="sequential")
    return Engine(config, SequentialBackend(exp), planner=exp.planner, data=exp.data).run(progress, checkpoint,
                                                                                        resume)


# --------------------------------------------------------------------------- sfl-v2


class ServerSequentialBackend(LocalBackend):
    """sfl-v2: every device starts from the global adapter and trains its own copy of the device part, while the
    one server part takes the devices' steps one device after another in the round's order (each device's steps
    update it before the next device's); the finished devices' adapters are averaged with the strategy's weights."""

    def execute(self, task: RoundTask, global_adapter: Adapter) -> RoundOutcome:
        exp = self.exp
        exp.server.set_lr_factor(task.lr_factor)
        devices = [int(k) for k in task.devices]
        batches = collated(task, exp.data.train, exp.data.pad_token_id, devices)
        figures = StepFigures()
        weighted: Adapter = {}
        for i, k in enumerate(devices):
            group = exp.device.start([k], global_adapter, task.lr_factor, task.fit, task.ranks[i:i + 1])
            side = CohortDevices(exp.device, group, task, [i], batches)
            figures.extend(run_steps(exp, task.steps[i], [1] * task.steps[i], side,
                                     InProcessServer(exp.server, task.round_index, exp.config.quant.activation_bits)))
            for name, value in group.weighted_sum([task.weights[i]]).items():
                weighted[name] = weighted[name] + value if name in weighted else value
        return RoundOutcome(weighted_sum=weighted, total_weight=float(sum(w for w in task.weights if w > 0)),
                            figures=figures)


def run_sfl_v2(config: ExperimentConfig, progress: ProgressFn | None = None, announce: Any = None,
               checkpoint: Checkpoint | None = None, resume: Resume | None = None) -> RunResult:
    exp = Experiment.build(config, schedule="server-sequential")
    return Engine(config, ServerSequentialBackend(exp), planner=exp.planner, data=exp.data).run(progress, checkpoint,
                                                                                              resume)


RUNNERS: dict[str, Callable[..., RunResult]] = {"fl": run_fl, "sl": run_sl, "sfl-v2": run_sfl_v2}
