"""The Ray runtime (`runtime: ray`): the reference runtime's round semantics on a pool of actors (DESIGN §5, §8).

The driver plans (allocation, device assignment) and the actors execute: edge workers run the device
part for contiguous chunks of the round's selected devices, the server-part group runs each local step
on all of them. Data moves as object references (the global adapter is put once per round, smashed
data and gradients go actor to actor); the driver waits with `ray.wait`. A lost edge worker is replaced
and its devices replayed from the gradients the server already sent, so the round's result equals the
fault-free one; a lost server rank stops the run with a clear error and the completed rounds kept.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from sflam.actors.edge import EdgeWorker
from sflam.actors.server import ServerRank
from sflam.cluster.connect import start_ray
from sflam.platform.config import ExperimentConfig
from sflam.platform.errors import SflamError
from sflam.platform.executors import Adapter
from sflam.platform.results import RoundMetrics, RunResult
from sflam.platform.runtime import (
    Experiment,
    ProgressFn,
    apply_plan,
    evaluation_batches,
    round_batches,
    select_devices,
)

Hook = Callable[["RayRuntime", int, int], None]
ACTOR_FAILURES = (RayActorError,)


class RunFailed(SflamError):
    """The run could not go on (a server rank failed); `partial` holds every completed round."""

    def __init__(self, message: str, partial: RunResult | None = None) -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class PoolLayout:
    """How the round's work maps onto actors."""

    workers: int
    devices_per_worker: int
    server_ranks: int
    engine: str
    cluster: str

    def describe(self) -> str:
        return (f"ray pool: {self.workers} edge worker(s) x up to {self.devices_per_worker} devices each, "
                f"server part: {self.engine} x {self.server_ranks} rank(s) ({self.cluster})")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connect(config: ExperimentConfig, needed_cpus: float) -> tuple[bool, str]:
    """Join RAY_ADDRESS (or ray.address) when set, else start a local cluster on 127.0.0.1.

    Returns whether this process started Ray (and so shuts it down) and a description of the cluster.
    """
    if ray.is_initialized():
        return False, "existing Ray session"
    env = {"env_vars": {"OMP_NUM_THREADS": str(config.ray.threads_per_worker), "TOKENIZERS_PARALLELISM": "false",
                        "HF_HUB_OFFLINE": "1"}}
    # a joined cluster (a job's own) keeps its runtime environment; num_cpus and env apply to a local start
    cpus = config.ray.local_cpus or max(os.cpu_count() or 1, math.ceil(needed_cpus))
    return True, start_ray(config.ray.address, num_cpus=cpus, runtime_env=env)


class RayRuntime:
    """Owns the actor pool for one experiment and runs its rounds."""

    def __init__(self, config: ExperimentConfig, experiment: Experiment | None = None,
                 hooks: dict[str, Hook] | None = None) -> None:
        self.config = config
        self.exp = experiment or Experiment.build(config)
        self.hooks = hooks or {}
        rc, srv = config.ray, config.server
        K = config.train.devices_per_round
        ranks = srv.ranks if srv.engine == "deepspeed" else 1
        if rc.workers:
            workers = rc.workers
        elif rc.devices_per_worker:
            workers = math.ceil(K / rc.devices_per_worker)
        else:
            workers = max(1, int((os.cpu_count() or 1) / rc.cpus_per_worker))
        workers = min(workers, K)
        self.owns_ray, cluster = connect(config, workers * rc.cpus_per_worker + ranks)
        if not (rc.workers or rc.devices_per_worker) and "local" not in cluster:
            available = float(ray.cluster_resources().get("CPU", 1))
            workers = min(K, max(1, int((available - ranks) / rc.cpus_per_worker)))
        per_worker = math.ceil(K / workers)
        if rc.devices_per_worker and per_worker > rc.devices_per_worker:
            needed = math.ceil(K / rc.devices_per_worker)
            raise SflamError(f"ray.devices_per_worker={rc.devices_per_worker} needs {needed} workers for {K} devices "
                             f"per round, but ray.workers={workers}")
        self.layout = PoolLayout(workers, per_worker, ranks, srv.engine, cluster)
        self.config_dict = config.to_dict()
        self._edge_cls = ray.remote(EdgeWorker)
        self._server_cls = ray.remote(ServerRank)
        self.workers = [self._new_worker() for _ in range(workers)]
        port = _free_port()
        gpus = srv.gpus_per_rank
        self.ranks: list[Any] = [self._server_cls.options(num_cpus=1, num_gpus=gpus, max_concurrency=1).remote(
            self.config_dict, rank, ranks, "127.0.0.1", port, rc.threads_per_worker) for rank in range(ranks)]
        ray.get([w.ready.remote() for w in self.workers] + [r.ready.remote() for r in self.ranks])
        self.replaced = 0

    def _new_worker(self) -> Any:
        rc = self.config.ray
        return self._edge_cls.options(num_cpus=rc.cpus_per_worker).remote(self.config_dict, rc.threads_per_worker)

    # ------------------------------------------------------------------ waiting with recovery
    def _gather(self, refs: dict[int, Any], recover: Callable[[int], Any]) -> dict[int, Any]:
        """Results of one call per worker; a worker that died is replaced and its call resubmitted."""
        pending = {ref: i for i, ref in refs.items()}
        out: dict[int, Any] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    out[i] = ray.get(ref)
                except ACTOR_FAILURES as exc:
                    print(f"edge worker {i} lost ({type(exc).__name__}); replacing it and replaying its devices",
                          file=sys.stderr, flush=True)
                    pending[recover(i)] = i
        return out

    def _replace(self, i: int, round_index: int, chunk: list[int], bits: list[int], global_ref: Any, lr: float,
                 offsets: list[int], history: list[list[Any]]) -> None:
        try:
            ray.kill(self.workers[i])
        except Exception:  # it is already gone
            pass
        worker = self._new_worker()
        self.workers[i] = worker
        self.replaced += 1
        if history:
            flat = ray.get([ref for step_refs in history for ref in step_refs])
            ranks = len(history[0])
            gradients = [flat[s * ranks:(s + 1) * ranks] for s in range(len(history))]
            mine = [[g for shard in step for g in shard][offsets[i]:offsets[i] + len(chunk)] for step in gradients]
        else:
            mine = []
        ray.get(worker.replay.remote(round_index, chunk, bits, global_ref, lr, mine))

    def _server_call(self, round_index: int, what: str, refs: list[Any]) -> list[Any]:
        try:
            return ray.get(refs)
        except (RayActorError, RayTaskError) as exc:
            raise RunFailed(f"the server part failed during {what} of round {round_index + 1} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the run stopped") from None

    # ------------------------------------------------------------------ a round
    def run_round(self, round_index: int, global_adapter: Adapter) -> tuple[Adapter, RoundMetrics]:
        cfg = self.config
        started = time.perf_counter()
        selected = select_devices(cfg.seed, round_index, cfg.data.num_devices, cfg.train.devices_per_round)
        lr = cfg.train.lr_factor(round_index)
        # ---- plan on the driver: allocation from the channels and the exact payloads
        plan = self.exp.planner.plan(round_index, selected, round_batches(self.exp, round_index, selected))
        bits = [int(q) for q in plan.allocation.bits]  # in the order of `selected`
        edges = np.linspace(0, len(selected), len(self.workers) + 1).round().astype(int)
        chunks = [[int(k) for k in selected[edges[i]:edges[i + 1]]] for i in range(len(self.workers))]
        chunk_bits = [bits[edges[i]:edges[i + 1]] for i in range(len(self.workers))]
        offsets = [int(e) for e in edges[:-1]]
        active = [i for i, chunk in enumerate(chunks) if chunk]
        global_ref = ray.put(global_adapter)  # once per round, shared by every worker
        for i in active:
            self.workers[i].start.remote(round_index, chunks[i], chunk_bits[i], global_ref, lr)
        history: list[list[Any]] = []
        losses, correct, seen, uplink, downlink = [], 0, 0, 0, 0

        def recover_with(step: int, call: Callable[[Any, int], Any]) -> Callable[[int], Any]:
            def recover(i: int) -> Any:
                self._replace(i, round_index, chunks[i], chunk_bits[i], global_ref, lr, offsets, history[:step])
                return call(self.workers[i], i)
            return recover

        for step in range(cfg.train.local_steps):
            # ---- devices: forward and encode the smashed data (every worker in parallel)
            message_refs: dict[int, Any] = {}

            def submit(worker: Any, i: int, s: int = step, refs: dict[int, Any] = message_refs) -> Any:
                messages_ref, bits_ref = worker.forward.options(num_returns=2).remote(s)
                refs[i] = messages_ref
                return bits_ref

            sizes = {i: submit(self.workers[i], i) for i in active}
            if "after_forward" in self.hooks:
                self.hooks["after_forward"](self, round_index, step)
            sizes = self._gather(sizes, recover_with(step, submit))
            uplink += sum(sizes.values())
            # ---- server: every rank runs the step on its shard; smashed data and gradients go by reference
            outs = [rank.step.options(num_returns=2).remote(round_index, step, lr, *[message_refs[i] for i in active])
                    for rank in self.ranks]
            stats = self._server_call(round_index, f"local step {step + 1}", [o[0] for o in outs])
            grad_refs = [o[1] for o in outs]
            history.append(grad_refs)
            step_samples = sum(s[2] for s in stats)
            losses.append(sum(s[0] for s in stats) / step_samples)
            correct, seen = correct + sum(s[1] for s in stats), seen + step_samples
            downlink += sum(s[3] for s in stats)
            # ---- devices: backward with their slice of the gradients (the driver does not wait for it)
            for i in active:
                self.workers[i].backward.remote(step, offsets[i], *grad_refs)
        # ---- aggregation: sample-weighted partial sums from every worker (FedAvg)
        steps = cfg.train.local_steps
        finished = self._gather({i: self.workers[i].finish.remote() for i in active},
                                recover_with(steps, lambda w, i: w.finish.remote()))
        total = sum(finished[i][1] for i in active)
        names = list(global_adapter)
        new_global = {n: sum((finished[i][0][n] for i in active[1:]), finished[active[0]][0][n]) / total
                      for n in names}
        metrics = RoundMetrics(round=round_index + 1, train_loss=float(np.mean(losses)), train_accuracy=correct / seen,
                               samples=seen, uplink_bits=uplink, downlink_bits=downlink,
                               wall_s=time.perf_counter() - started, step_losses=[float(v) for v in losses])
        return new_global, apply_plan(metrics, plan)

    def evaluate(self, adapter: Adapter) -> tuple[float, float]:
        numbers = [n for n, _ in evaluation_batches(self.config, self.exp.data)]
        adapter_ref = ray.put(adapter)
        groups = np.array_split(np.array(numbers), len(self.workers))
        refs = {i: self.workers[i].infer.remote(adapter_ref, [int(n) for n in g]) for i, g in enumerate(groups)
                if len(g)}
        messages = self._gather(refs, lambda i: self._new_and_infer(i, adapter_ref, groups[i]))
        message_refs = [ray.put(messages[i]) for i in sorted(messages)]
        results = self._server_call(-1, "evaluation", [r.evaluate.remote(*message_refs) for r in self.ranks])
        total_loss, total_correct, total = results[0]
        return total_correct / total, total_loss / total

    def _new_and_infer(self, i: int, adapter_ref: Any, numbers: np.ndarray) -> Any:
        self.workers[i] = self._new_worker()
        self.replaced += 1
        return self.workers[i].infer.remote(adapter_ref, [int(n) for n in numbers])

    def server_state(self) -> Adapter:
        return self._server_call(-1, "state", [r.state.remote() for r in self.ranks])[0]

    def shutdown(self) -> None:
        for actor in self.workers + self.ranks:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        if self.owns_ray:
            ray.shutdown()


def run_ray(config: ExperimentConfig, progress: ProgressFn | None = None, experiment: Experiment | None = None,
            hooks: dict[str, Hook] | None = None, announce: Callable[[str], None] | None = None) -> RunResult:
    """Every round of an experiment on the Ray runtime; the same result as `run_local` for the same seed."""
    started = time.perf_counter()
    runtime = RayRuntime(config, experiment, hooks)
    if announce is not None:
        announce(runtime.layout.describe())
    exp = runtime.exp
    global_adapter = exp.device.initial_adapter()
    rounds: list[RoundMetrics] = []
    accuracy, loss = float("nan"), float("nan")

    def result(server_state: Adapter) -> RunResult:
        from sflam.platform.quantization import stored_weight_bytes

        return RunResult(config=config.to_flat(), rounds=rounds, accuracy=accuracy, loss=loss,
                         wall_s=time.perf_counter() - started, devices=config.data.num_devices,
                         devices_per_round=config.train.devices_per_round,
                         device_weight_bytes=stored_weight_bytes(exp.device.part), device_adapter=global_adapter,
                         server_state=server_state, device_memory_bytes=exp.memory.total, memory=exp.memory)

    try:
        total = config.train.rounds
        for round_index in range(total):
            try:
                global_adapter, metrics = runtime.run_round(round_index, global_adapter)
                if (round_index + 1) % config.train.eval_every == 0 or round_index == total - 1:
                    eval_started = time.perf_counter()
                    accuracy, loss = runtime.evaluate(global_adapter)
                    metrics.eval_accuracy, metrics.eval_loss = accuracy, loss
                    metrics.wall_s += time.perf_counter() - eval_started
            except RunFailed as failure:
                failure.partial = result({})
                raise
            rounds.append(metrics)
            if progress is not None:
                progress(metrics)
        return result(runtime.server_state())
    finally:
        runtime.shutdown()
