"""The one round engine: every method and both runtimes run their rounds through `Engine`.

As in Flower's Strategy/driver split, the engine decides and a backend carries out. Each round: configure
(who is available, over-selection with the K first to finish by the cost model, mid-round dropouts, the plan,
the aggregation weights and the strategy's instructions, all on the driver), fit (the backend runs the local
steps: in this process, on Ray actors, a whole model per device, or devices one after another), aggregate (the
strategy turns the weighted average into the new global adapter), evaluate every `eval_every` rounds,
checkpoint atomically, report. The loop, the cadence, the metrics and the result are written once here;
backends never decide which devices, weights, batches or bits they use.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sflam.platform.config import ExperimentConfig
from sflam.platform.data import DataBundle
from sflam.platform.errors import ConfigError, RunFailed, SflamError
from sflam.platform.participation import (
    available_devices,
    choose,
    dropout_steps,
    keep_first_to_finish,
    round_indices,
    round_shapes,
)
from sflam.platform.planner import RoundPlan, RoundPlanner
from sflam.platform.protocol import StepFigures
from sflam.platform.results import Resume, RoundMetrics, RunResult
from sflam.platform.strategies import Adapter, FitInstructions, Strategy, build_strategy
from sflam.privacy.accounting import guarantee, worst_case_releases

ProgressFn = Callable[[RoundMetrics], None]


# --------------------------------------------------------------------------- what the driver hands out


@dataclass(kw_only=True)
class RoundTask:
    """The driver's decisions for one round, carried out by a backend as they are."""

    round_index: int
    devices: np.ndarray                  # the devices that run, in order
    bits: list[int]                      # smashed-data bits per device (the plan's)
    steps: list[int]                     # local steps each device completes (fewer: it drops out after them)
    weights: list[float]                 # aggregation weight per device (0: its adapter never enters the average)
    indices: dict[int, list[np.ndarray]]  # each device's mini-batches as sample indices, step by step
    lr_factor: float
    fit: FitInstructions
    ranks: list[int] = field(default_factory=list)  # each device's LoRA rank (empty: all at the global adapter's)
    cuts: list[int] = field(default_factory=list)  # each device's cut layer (empty: all at the device part's)

    def live(self, step: int) -> list[int]:
        """Positions (in `devices`) of the devices still taking part at a local step."""
        return [i for i, s in enumerate(self.steps) if s > step]

    @property
    def local_steps(self) -> int:
        """The local steps of the round (the most any device runs)."""
        return max(self.steps, default=0)


@dataclass(kw_only=True)
class RoundOutcome:
    """What a backend returns: the weighted adapter sum of the devices that finished and the steps' figures."""

    weighted_sum: Adapter
    total_weight: float
    figures: StepFigures = field(default_factory=StepFigures)
    # devices at several cuts: each tensor's total weight over the devices that hold it (a tensor missing from
    # `weighted_sum` was held by none of them); None: every tensor's is `total_weight`
    tensor_weights: dict[str, float] | None = None


class Backend(ABC):
    """Carries out a round's local steps (in this process, on Ray actors, ...); built once per run."""

    @abstractmethod
    def initial_adapter(self) -> Adapter: ...

    @abstractmethod
    def execute(self, task: RoundTask, global_adapter: Adapter) -> RoundOutcome: ...

    @abstractmethod
    def evaluate(self, adapter: Adapter) -> tuple[float, float]:
        """Test accuracy and mean loss of the deployed pipeline with `adapter`."""

    def server_state(self) -> Adapter:
        return {}

    def server_checkpoint(self) -> dict[str, Any] | None:
        """The server part and its optimizer state (None: this backend cannot be resumed exactly)."""
        return {}

    def restore_server(self, state: dict[str, Any]) -> None:
        del state

    def leakage(self, adapter: Adapter) -> dict[str, float] | None:
        """The monitoring attacks on what this backend's devices send, with `adapter` (None: nothing is sent)."""
        del adapter
        return None

    def merge_server_copies(self, adapter: Adapter, task: RoundTask) -> Adapter:
        """Devices at several cuts: the blocks between the cuts merged with the server's copies (the new global
        copy of each, on the server too); a backend that cannot hold devices at several cuts never gets here."""
        raise NotImplementedError(f"{type(self).__name__} runs every device at one cut")

    @abstractmethod
    def result_fields(self) -> dict[str, Any]:
        """device_weight_bytes, device_memory_bytes, memory and kernels of the RunResult."""

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------- the engine


class Engine:
    """One loop for every method and runtime: configure, fit, aggregate, evaluate, checkpoint, report."""

    def __init__(self, config: ExperimentConfig, backend: Backend, *, planner: RoundPlanner, data: DataBundle,
                 strategy: Strategy | None = None) -> None:
        self.config = config
        self.backend = backend
        self.planner = planner
        self.data = data
        self.strategy = strategy or build_strategy(config)

    # ------------------------------------------------------------------ configure
    def configure(self, round_index: int) -> tuple[RoundTask, RoundPlan | None, dict[str, int]]:
        """Who takes part, the plan, and the instructions: every decision of the round, on the driver."""
        cfg = self.config
        K = cfg.train.devices_per_round
        pool = available_devices(cfg, round_index)
        wanted = math.ceil(K * (1 + cfg.participation.over_selection) - 1e-9)
        candidates = choose(cfg.seed, round_index, pool, wanted)
        indices = round_indices(cfg, self.data, round_index, candidates)
        shapes = round_shapes(self.data, indices)
        plan = self.planner.plan(round_index, candidates, shapes) if len(candidates) else None
        devices = candidates
        if plan is not None and len(candidates) > K:  # over-selection: the K first to finish by the cost model
            devices = candidates[keep_first_to_finish(plan.solo_s, K)]
            indices = {int(k): indices[int(k)] for k in devices}
            shapes = {int(k): shapes[int(k)] for k in devices}
            plan = self.planner.plan(round_index, devices, shapes)
        steps = dropout_steps(cfg, round_index, devices)
        if plan is not None and min(steps) < cfg.train.local_steps:  # price what runs: dropouts stop early
            plan = self.planner.plan(round_index, devices, {int(k): shapes[int(k)][:s]
                                                           for k, s in zip(devices, steps, strict=True)})
        if cfg.aggregation.weights == "shard":
            weights = [float(len(self.data.shards[k])) if s == cfg.train.local_steps else 0.0
                       for k, s in zip(devices, steps, strict=True)]
        else:
            weights = [float(sum(shape.samples for shape in shapes[int(k)][:s])) if s == cfg.train.local_steps
                       else 0.0 for k, s in zip(devices, steps, strict=True)]
        bits = [int(q) for q in plan.allocation.bits] if plan is not None else []  # in the order of `devices`
        task = RoundTask(round_index=round_index, devices=np.asarray(devices), bits=bits, steps=steps,
                         weights=weights, indices=indices, lr_factor=cfg.train.lr_factor(round_index),
                         fit=self.strategy.configure_fit(round_index), ranks=self.planner.ranks(devices),
                         cuts=list(plan.cuts) if plan is not None else [])
        dropped = sum(s < cfg.train.local_steps for s in steps)
        counts = {"selected": len(candidates), "late": len(candidates) - len(devices), "dropped": dropped,
                  "finished": len(devices) - dropped}
        return task, plan, counts

    # ------------------------------------------------------------------ one round
    def run_round(self, round_index: int, global_adapter: Adapter) -> tuple[Adapter, RoundMetrics]:
        started = time.perf_counter()
        task, plan, counts = self.configure(round_index)
        # ---- fit: the backend carries out the local steps of the plan
        if len(task.devices):
            outcome = self.backend.execute(task, global_adapter)
        else:  # nobody available: the global adapter carries over
            outcome = RoundOutcome(weighted_sum={}, total_weight=0.0)
        # ---- aggregate: the strategy's rule over the weighted average of the devices that finished
        new_global = global_adapter
        if outcome.total_weight > 0:
            average = {n: (t / outcome.total_weight).to(global_adapter[n].dtype)
                       for n, t in outcome.weighted_sum.items()}
            if outcome.tensor_weights is not None:  # each tensor over the devices that held it; none: kept
                average = {n: (outcome.weighted_sum[n] / outcome.tensor_weights[n]).to(t.dtype)
                           if n in outcome.weighted_sum else t for n, t in global_adapter.items()}
            new_global = self.strategy.aggregate(round_index, global_adapter, average)
            if task.cuts:
                new_global = self.backend.merge_server_copies(new_global, task)
        figures = outcome.figures
        losses = figures.step_losses
        metrics = RoundMetrics(round=round_index + 1, train_loss=float(np.mean(losses)) if losses else math.nan,
                               train_accuracy=figures.correct / figures.samples if figures.samples else math.nan,
                               samples=figures.samples, uplink_bits=figures.uplink_bits,
                               downlink_bits=figures.downlink_bits, wall_s=time.perf_counter() - started,
                               step_losses=[float(v) for v in losses], selected=counts["selected"],
                               finished=counts["finished"], dropped=counts["dropped"], late=counts["late"])
        if plan is not None:
            apply_plan(metrics, plan)
        return new_global, metrics

    # ------------------------------------------------------------------ the run
    def run(self, progress: ProgressFn | None = None, checkpoint: Callable[[Resume], None] | None = None,
            resume: Resume | None = None) -> RunResult:
        """Every round from the first (or the resumed one) to `train.rounds`; the RunResult assembled once."""
        cfg = self.config
        started = time.perf_counter()
        global_adapter = self.backend.initial_adapter()
        rounds: list[RoundMetrics] = []
        accuracy, loss, before = math.nan, math.nan, 0.0
        first = 0
        if resume is not None:
            global_adapter, rounds = resume.global_adapter, list(resume.rounds)
            accuracy, loss, before, first = resume.accuracy, resume.loss, resume.wall_s, resume.next_round
            self.strategy.load_state(resume.strategy)
            if resume.server is None:
                raise RunFailed("the checkpoint holds no server-part state (written by a version that did not "
                                "checkpoint DeepSpeed servers): run without --resume")
            if resume.server:
                self.backend.restore_server(resume.server)

        def result(server_state: Adapter) -> RunResult:
            fields = self.backend.result_fields()  # a backend's own privacy facts (fl: no label leaves) come last
            privacy = {**privacy_fields(cfg, self.data), **fields.pop("privacy", {})}
            return RunResult(config=cfg.to_flat(), rounds=rounds, accuracy=accuracy, loss=loss,
                             wall_s=before + time.perf_counter() - started, devices=cfg.data.num_devices,
                             devices_per_round=cfg.train.devices_per_round, device_adapter=global_adapter,
                             server_state=server_state, privacy=privacy, device_classes=device_classes(self.planner),
                             **fields)

        total = cfg.train.rounds
        round_index = first
        try:
            for round_index in range(first, total):
                round_started = time.perf_counter()
                global_adapter, metrics = self.run_round(round_index, global_adapter)
                # ---- evaluate: every eval_every rounds and after the last
                if (round_index + 1) % cfg.train.eval_every == 0 or round_index == total - 1:
                    accuracy, loss = self.backend.evaluate(global_adapter)
                    metrics.eval_accuracy, metrics.eval_loss = accuracy, loss
                # ---- leakage: every privacy.evaluate_every rounds and after the last
                every = cfg.privacy.evaluate_every
                if every and ((round_index + 1) % every == 0 or round_index == total - 1):
                    found = self.backend.leakage(global_adapter)
                    if found is not None:
                        metrics.leakage, metrics.leakage_metrics = found["leakage"], found
                metrics.wall_s = time.perf_counter() - round_started
                rounds.append(metrics)
                # ---- checkpoint (atomic), then report: a kill between the two loses nothing
                if checkpoint is not None:
                    checkpoint(Resume(next_round=round_index + 1, global_adapter=global_adapter, rounds=rounds,
                                      accuracy=accuracy, loss=loss, wall_s=before + time.perf_counter() - started,
                                      strategy=self.strategy.state(), server=self.backend.server_checkpoint()))
                if progress is not None:
                    progress(metrics)
        except RunFailed as failure:
            failure.partial = result({})
            raise
        except SflamError as failure:  # e.g. a diverged model's non-finite smashed data: the run failed, not its usage
            if isinstance(failure, ConfigError):
                raise
            raise RunFailed(f"round {round_index + 1} failed: {failure}", result({})) from failure
        return result(self.backend.server_state())


def privacy_fields(config: ExperimentConfig, data: DataBundle) -> dict[str, Any]:
    """What a run's summary says of its privacy: whether labels leave the devices, and the (epsilon, delta) of a
    noise defence over this run's rounds (`sflam.privacy.accounting`: its statement says what is covered)."""
    p, train = config.privacy, config.train
    fields: dict[str, Any] = {"labels_sent": config.split.head == "server"}
    found = guarantee(p.noise_sigma, p.clip_norm, worst_case_releases(data.shard_sizes, train.batch_size,
                                                                      train.local_steps, train.rounds), p.delta)
    if found is not None:
        fields.update(privacy_epsilon=found.epsilon, privacy_delta=found.delta, privacy_releases=found.releases)
    return fields


def device_classes(planner: RoundPlanner) -> dict[str, dict[str, Any]]:
    """Each device class's number of devices in the population and its memory budget (empty: no classes); with
    lora.rank_policy=by-class its LoRA rank and the measured device-part peak at that rank too."""
    counts = planner.population.class_counts()
    out: dict[str, dict[str, Any]] = {c.name: {"devices": counts[c.name], "memory_mib": c.memory_mib}
                                      for c in planner.population.classes}
    if planner.config.lora.rank_policy == "by-class":
        for c in planner.population.classes:
            rank = c.lora_rank or planner.config.lora.rank
            out[c.name].update(lora_rank=rank, memory_bytes=planner.memory_by_rank.get(rank))
    if planner.memory_by_cut:  # devices at several cuts: the cuts each class's budget holds (memory: its cut)
        for c in planner.population.classes:
            fitting = [cut for cut, peak in sorted(planner.memory_by_cut.items()) if peak <= c.memory_mib * 2**20]
            out[c.name]["cuts_fitting"] = fitting
            if c.name in planner.class_cuts:
                cut = planner.class_cuts[c.name]
                out[c.name].update(cut=cut, memory_bytes=planner.memory_by_cut[cut])
            else:  # joint: the deepest a device of the class may be given
                out[c.name]["memory_bytes"] = planner.memory_by_cut[max(fitting)] if fitting else None
    return out


def apply_plan(metrics: RoundMetrics, plan: RoundPlan) -> RoundMetrics:
    """Copy the plan's cost figures onto the round's metrics (the engine never computes costs itself)."""
    for key, value in plan.metrics().items():
        setattr(metrics, key, value)
    metrics.plan = plan
    return metrics
