"""The one round engine: every method and both runtimes run their rounds through `Engine` (DESIGN §5, §8).

As in Flower's Strategy/driver split, the engine decides and an executor carries out. Each round:
configure (who is available, over-selection with the K first to finish by the cost model, mid-round
dropouts, the plan, the aggregation weights and the strategy's instructions), fit (the executor runs the
local steps: in-process, on Ray actors, a whole model per device, or devices one after another),
aggregate (the strategy turns the weighted average into the new global adapter), evaluate every
`eval_every` rounds, checkpoint atomically, report. The loop, the cadence, the metrics and the result are
written once here; executors never decide which devices, weights, batches or bits they use.
"""

from __future__ import annotations

import csv
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from sflam.platform.config import ExperimentConfig
from sflam.platform.data import Batch, collate, device_batches
from sflam.platform.errors import ConfigError, RunFailed, SflamError
from sflam.platform.results import RoundMetrics, RunResult
from sflam.platform.strategies import Adapter, FitInstructions, Strategy, build_strategy

ProgressFn = Callable[[RoundMetrics], None]


# --------------------------------------------------------------------------- what the driver hands out


@dataclass
class RoundTask:
    """The driver's decisions for one round, carried out by an executor as they are."""

    round_index: int
    devices: np.ndarray                  # the devices that run, in order
    bits: list[int]                      # smashed-data bits per device (the plan's)
    steps: list[int]                     # local steps each device completes (fewer: it drops out after them)
    weights: list[float]                 # aggregation weight per device (0: its adapter never enters the average)
    indices: dict[int, list[np.ndarray]]  # each device's mini-batches as sample indices, step by step
    lr_factor: float
    fit: FitInstructions
    batches: dict[int, list[Batch]] = field(default_factory=dict, repr=False)  # collated, for in-process executors

    def live(self, step: int) -> list[int]:
        """Positions (in `devices`) of the devices still taking part at a local step."""
        return [i for i, s in enumerate(self.steps) if s > step]


@dataclass
class RoundOutcome:
    """What an executor returns: the weighted adapter sum of the devices that finished and the step figures."""

    weighted_sum: Adapter
    total_weight: float
    step_losses: list[float]
    correct: int
    samples: int
    uplink_bits: int
    downlink_bits: int


class Executor(ABC):
    """Carries out a round's local steps; built once per run. `planner.plan(round, devices, batches)`
    gives the round's plan from the cost model (a RoundPlan, or one with the same `metrics()`,
    `table()` and `allocation.bits` / `allocation.latency_s`)."""

    config: ExperimentConfig
    data: Any          # DataBundle: train set, shards, pad token
    planner: Any

    @abstractmethod
    def initial_adapter(self) -> Adapter: ...

    @abstractmethod
    def execute(self, task: RoundTask, global_adapter: Adapter) -> RoundOutcome: ...

    @abstractmethod
    def evaluate(self, adapter: Adapter) -> tuple[float, float]: ...

    def server_state(self) -> Adapter:
        return {}

    def server_checkpoint(self) -> dict[str, Any] | None:
        """The server part and its optimizer state (None: this executor cannot be resumed exactly)."""
        return {}

    def restore_server(self, state: dict[str, Any]) -> None:
        del state

    @abstractmethod
    def result_fields(self) -> dict[str, Any]:
        """device_weight_bytes, device_memory_bytes and memory of the RunResult."""

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------- participation


def select_devices(seed: int, round_index: int, num_devices: int, per_round: int) -> np.ndarray:
    """The K devices of a round, seeded by (seed, round) alone."""
    return choose(seed, round_index, np.arange(num_devices), per_round)


def choose(seed: int, round_index: int, pool: np.ndarray, count: int) -> np.ndarray:
    rng = np.random.default_rng([seed, round_index, 7])
    return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))


@lru_cache(maxsize=8)
def read_trace(path: str) -> dict[int, frozenset[int]]:
    """An availability trace: CSV rows `device,round` (0-based) -> the devices available in each round."""
    rounds: dict[int, set[int]] = {}
    with Path(path).open(newline="") as handle:
        for row in csv.DictReader(handle):
            rounds.setdefault(int(row["round"]), set()).add(int(row["device"]))
    return {r: frozenset(d) for r, d in rounds.items()}


def available_devices(config: ExperimentConfig, round_index: int) -> np.ndarray:
    """The devices that can be selected in a round: all, a seeded Bernoulli draw, or the trace's."""
    n, part = config.data.num_devices, config.participation
    if part.trace is not None:
        return np.array(sorted(k for k in read_trace(part.trace).get(round_index, ()) if k < n), dtype=np.int64)
    if part.availability >= 1.0:
        return np.arange(n)
    draw = np.random.default_rng([config.seed, round_index, 11]).random(n)
    return np.flatnonzero(draw < part.availability)


def dropout_steps(config: ExperimentConfig, round_index: int, devices: np.ndarray) -> list[int]:
    """Local steps each device completes: E, or fewer for a device that drops out (seeded per device)."""
    steps, p = config.train.local_steps, config.participation.dropout
    out = []
    for k in devices:
        rng = np.random.default_rng([config.seed, round_index, int(k), 13])
        drops, after = rng.random() < p, int(rng.integers(0, steps))
        out.append(after if drops else steps)
    return out


def keep_first_to_finish(latency_s: np.ndarray, count: int) -> np.ndarray:
    """Positions of the `count` devices that finish first in simulated time (ties: the lower position)."""
    return np.sort(np.argsort(np.asarray(latency_s), kind="stable")[:count])


# --------------------------------------------------------------------------- the engine


@dataclass
class Resume:
    """Where a run continues from (read from its last checkpoint)."""

    next_round: int
    global_adapter: Adapter
    rounds: list[RoundMetrics]
    accuracy: float
    loss: float
    wall_s: float
    strategy: dict[str, Adapter]
    server: dict[str, Any] | None


class Engine:
    """One loop for every method and runtime: configure, fit, aggregate, evaluate, checkpoint, report."""

    def __init__(self, config: ExperimentConfig, executor: Executor, strategy: Strategy | None = None) -> None:
        self.config = config
        self.executor = executor
        self.strategy = strategy or build_strategy(config)

    # ------------------------------------------------------------------ configure
    def batches(self, round_index: int, devices: np.ndarray) -> tuple[dict[int, list[np.ndarray]],
                                                                      dict[int, list[Batch]]]:
        cfg, data = self.config, self.executor.data
        indices = {int(k): device_batches(data.shards[k], cfg.train.batch_size, cfg.train.local_steps, cfg.seed,
                                          round_index, int(k)) for k in devices}
        collated = {k: [collate(data.train, idx, data.pad_token_id) for idx in steps] for k, steps in indices.items()}
        return indices, collated

    def configure(self, round_index: int) -> tuple[RoundTask, Any, dict[str, int]]:
        """Who takes part, the plan, and the instructions: every decision of the round, on the driver."""
        cfg = self.config
        K = cfg.train.devices_per_round
        pool = available_devices(cfg, round_index)
        wanted = math.ceil(K * (1 + cfg.participation.over_selection) - 1e-9)
        candidates = choose(cfg.seed, round_index, pool, wanted)
        indices, batches = self.batches(round_index, candidates)
        plan = self.executor.planner.plan(round_index, candidates, batches) if len(candidates) else None
        devices = candidates
        if plan is not None and len(candidates) > K:  # over-selection: the K first to finish by the cost model
            devices = candidates[keep_first_to_finish(plan.solo_s, K)]
            indices = {int(k): indices[int(k)] for k in devices}
            batches = {int(k): batches[int(k)] for k in devices}
            plan = self.executor.planner.plan(round_index, devices, batches)
        steps = dropout_steps(cfg, round_index, devices)
        if plan is not None and min(steps) < cfg.train.local_steps:  # price what runs: dropouts stop early
            plan = self.executor.planner.plan(round_index, devices, {int(k): batches[int(k)][:s]
                                                                     for k, s in zip(devices, steps, strict=True)})
        if cfg.aggregation.weights == "shard":
            weights = [float(len(self.executor.data.shards[k])) if s == cfg.train.local_steps else 0.0
                       for k, s in zip(devices, steps, strict=True)]
        else:
            weights = [float(sum(len(b) for b in batches[int(k)][:s])) if s == cfg.train.local_steps else 0.0
                       for k, s in zip(devices, steps, strict=True)]
        bits = [int(q) for q in plan.allocation.bits] if plan is not None else []  # in the order of `devices`
        task = RoundTask(round_index, np.asarray(devices), bits, steps, weights, indices,
                         cfg.train.lr_factor(round_index), self.strategy.configure_fit(round_index), batches)
        dropped = sum(s < cfg.train.local_steps for s in steps)
        counts = {"selected": len(candidates), "late": len(candidates) - len(devices), "dropped": dropped,
                  "finished": len(devices) - dropped}
        return task, plan, counts

    # ------------------------------------------------------------------ one round
    def run_round(self, round_index: int, global_adapter: Adapter) -> tuple[Adapter, RoundMetrics]:
        started = time.perf_counter()
        task, plan, counts = self.configure(round_index)
        # ---- fit: the executor carries out the local steps of the plan
        if len(task.devices):
            outcome = self.executor.execute(task, global_adapter)
        else:  # nobody available: the global adapter carries over
            outcome = RoundOutcome({}, 0.0, [], 0, 0, 0, 0)
        # ---- aggregate: the strategy's rule over the weighted average of the devices that finished
        new_global = global_adapter
        if outcome.total_weight > 0:
            average = {n: (t / outcome.total_weight).to(global_adapter[n].dtype)
                       for n, t in outcome.weighted_sum.items()}
            new_global = self.strategy.aggregate(round_index, global_adapter, average)
        losses = outcome.step_losses
        metrics = RoundMetrics(round=round_index + 1, train_loss=float(np.mean(losses)) if losses else math.nan,
                               train_accuracy=outcome.correct / outcome.samples if outcome.samples else math.nan,
                               samples=outcome.samples, uplink_bits=outcome.uplink_bits,
                               downlink_bits=outcome.downlink_bits, wall_s=time.perf_counter() - started,
                               step_losses=[float(v) for v in losses], **counts)
        if plan is not None:
            apply_plan(metrics, plan)
        return new_global, metrics

    # ------------------------------------------------------------------ the run
    def run(self, progress: ProgressFn | None = None, checkpoint: Callable[[Resume], None] | None = None,
            resume: Resume | None = None) -> RunResult:
        """Every round from the first (or the resumed one) to `train.rounds`; the RunResult assembled once."""
        cfg = self.config
        started = time.perf_counter()
        global_adapter = self.executor.initial_adapter()
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
                self.executor.restore_server(resume.server)

        def result(server_state: Adapter) -> RunResult:
            return RunResult(config=cfg.to_flat(), rounds=rounds, accuracy=accuracy, loss=loss,
                             wall_s=before + time.perf_counter() - started, devices=cfg.data.num_devices,
                             devices_per_round=cfg.train.devices_per_round, device_adapter=global_adapter,
                             server_state=server_state, **self.executor.result_fields())

        total = cfg.train.rounds
        try:
            for round_index in range(first, total):
                round_started = time.perf_counter()
                global_adapter, metrics = self.run_round(round_index, global_adapter)
                # ---- evaluate: every eval_every rounds and after the last
                if (round_index + 1) % cfg.train.eval_every == 0 or round_index == total - 1:
                    accuracy, loss = self.executor.evaluate(global_adapter)
                    metrics.eval_accuracy, metrics.eval_loss = accuracy, loss
                metrics.wall_s = time.perf_counter() - round_started
                rounds.append(metrics)
                # ---- checkpoint (atomic), then report: a kill between the two loses nothing
                if checkpoint is not None:
                    checkpoint(Resume(round_index + 1, global_adapter, rounds, accuracy, loss,
                                      before + time.perf_counter() - started, self.strategy.state(),
                                      self.executor.server_checkpoint()))
                if progress is not None:
                    progress(metrics)
        except RunFailed as failure:
            failure.partial = result({})
            raise
        except SflamError as failure:  # e.g. a diverged model's non-finite smashed data: the run failed, not its usage
            if isinstance(failure, ConfigError):
                raise
            raise RunFailed(f"round {round_index + 1} failed: {failure}", result({})) from failure
        return result(self.executor.server_state())


def apply_plan(metrics: RoundMetrics, plan: Any) -> RoundMetrics:
    """Copy the plan's cost figures onto the round's metrics (the engine never computes costs itself)."""
    for key, value in plan.metrics().items():
        setattr(metrics, key, value)
    metrics.plan = plan
    return metrics
