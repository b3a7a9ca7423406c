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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sflam.platform.allocation import AllocationProblem, equal_allocation
from sflam.platform.build import build_parts, prepare_data, quiet_libraries, validate
from sflam.platform.config import ExperimentConfig, config_from_dict
from sflam.platform.costs import FlopTable, RoundPlan, RoundPlanner, measure_device_memory
from sflam.platform.data import Batch, collate
from sflam.platform.engine import Engine, Executor, Resume, RoundOutcome, RoundTask
from sflam.platform.executors import Adapter, trainable_state
from sflam.platform.quantization import stored_weight_bytes
from sflam.platform.results import RoundMetrics, RunResult
from sflam.platform.runtime import Experiment, LocalExecutor, evaluation_batches
from sflam.platform.strategies import weighted_sum
from sflam.platform.system import compute_energy_j, compute_latency_s, noise_w_per_hz

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
                  trains_device: bool, shards: list[np.ndarray] | None = None) -> Any:
    """The one place a method gets its round planner: `.plan(round, devices, batches)` -> plan.

    sfl, sfl-q and sflam: the cost model's RoundPlanner (lockstep split). fl and sl: today's pricing of
    their schedules (whole model on the device; devices one after another), kept here until the cost
    model plans every schedule (RoundPlanner's `schedule` keyword: "local" for fl, "sequential" for sl).
    """
    planner = RoundPlanner(config, flops, adapter_bits, trains_device=trains_device)
    if method == "fl":
        assert shards is not None
        return LocalTrainingPlanner(planner, shards)
    if method == "sl":
        return SequentialPlanner(planner)
    return planner


def _adapter_exchange_problem(config: ExperimentConfig, gain: np.ndarray, up: np.ndarray, down: np.ndarray,
                              fixed: np.ndarray, compute_j: np.ndarray) -> AllocationProblem:
    sysc = config.system
    K = len(gain)
    return AllocationProblem(
        gain=gain, uplink_bits=up[:, None].astype(float), downlink_bits=down.astype(float), fixed_latency_s=fixed,
        compute_energy_j=compute_j, bits_options=np.array([32]), raw_uplink_bits=up.astype(float),
        distortion_weight=np.full(K, 1.0 / K), distortion_budget=0.0, bandwidth_hz=sysc.bandwidth_hz,
        max_power_w=sysc.max_power_w, server_power_w=sysc.server_power_w,
        n0=noise_w_per_hz(sysc.noise_dbm_per_hz), lam=config.allocation.lam)


@dataclass
class LocalTrainingPlanner:
    """fl: each device trains the whole model on its batches, then the adapter (and head) goes down and up
    at equal bandwidth and full power; no smashed data."""

    planner: RoundPlanner
    shards: list[np.ndarray]

    def plan(self, round_index: int, devices: np.ndarray, batches: dict[int, list[Batch]]) -> RoundPlan:
        p, cfg = self.planner, self.planner.config
        device_flops = np.zeros(len(devices))
        for i, k in enumerate(devices):
            for batch in batches[int(k)]:
                fwd, bwd = p.flops.device(int(batch.input_ids.shape[1]))
                device_flops[i] += len(batch) * (fwd + bwd)
        clock = p.population.clock_hz[devices]
        compute_s = compute_latency_s(device_flops, clock, cfg.system)
        up = np.full(len(devices), p.adapter_bits)
        problem = _adapter_exchange_problem(cfg, p.population.gains(devices, cfg.seed, round_index), up, up,
                                            compute_s, compute_energy_j(device_flops, clock, cfg.system))
        return RoundPlan(np.asarray(devices), equal_allocation(problem, 32),
                         np.array([len(self.shards[k]) for k in devices]), compute_s, 0.0)


@dataclass
class SequentialAllocation:
    bits: np.ndarray
    latency_s: np.ndarray  # each device's own time on the channel (alone, whole band)


@dataclass
class SequentialPlan:
    """sl: the devices one after another, each alone on the channel: the round takes the sum of their times."""

    plans: list[RoundPlan]

    @property
    def allocation(self) -> SequentialAllocation:
        return SequentialAllocation(np.concatenate([p.allocation.bits for p in self.plans]),
                                    np.array([p.allocation.round_latency_s for p in self.plans]))

    def metrics(self) -> dict[str, float]:
        allocations = [p.allocation for p in self.plans]
        return {"round_latency_s": float(sum(a.round_latency_s for a in allocations)),
                "comm_latency_s": float(sum(float(a.comm_latency_s.sum()) for a in allocations)),
                "compute_latency_s": float(sum(float(p.compute_s.sum()) + p.server_s for p in self.plans)),
                "energy_j": float(sum(a.total_energy_j for a in allocations)),
                "bits_mean": 32.0, "bits_min": 32.0, "bits_max": 32.0}

    def table(self) -> list[dict[str, float]]:
        return [row for p in self.plans for row in p.table()]


@dataclass
class SequentialPlanner:
    planner: RoundPlanner

    def plan(self, round_index: int, devices: np.ndarray, batches: dict[int, list[Batch]]) -> SequentialPlan:
        plans = []
        for k in devices:  # its costs: alone on the channel, whole band, full power
            problem, samples, compute_s, server_s = self.planner.problem(round_index, np.array([k]),
                                                                         {int(k): batches[int(k)]})
            plans.append(RoundPlan(np.array([k]), equal_allocation(problem, 32), samples, compute_s, server_s))
        return SequentialPlan(plans)


# --------------------------------------------------------------------------- FL


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
        flops = FlopTable(self.model, nn.Identity(), self.initial, int(device_part.config.hidden_size))
        longest = np.argsort([-len(s) for s in self.data.train.input_ids])[: config.train.batch_size]
        self.memory = measure_device_memory(self.model, self.initial,
                                            collate(self.data.train, longest, self.data.pad_token_id))
        self.planner = build_planner("fl", config, flops, self.adapter_bits, True, self.data.shards)

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
                "memory": self.memory}


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
