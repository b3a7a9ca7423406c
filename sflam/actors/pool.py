"""The actor pool of a Ray run: where the edge workers and the server ranks go, how they start, load the driver's
built parts, are awaited, and are replaced when lost.

Placement (docs/concepts/ray-runtime.md): the server ranks take a placement group (`server.placement`: pack or
spread), the edge workers are spread over the nodes; rank 0 names the group's rendezvous on its own node. A shape no
node can host fails at once, one that waits longer than `ray.placement_timeout_s` fails then; either way in one
line, and nothing the pool had taken stays on the cluster. A local cluster this driver starts is guarded by a
watchdog process that ends it if the driver is killed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sflam.actors.edge import EdgeWorker
from sflam.actors.failures import WorkerError
from sflam.actors.server import ServerRank
from sflam.cluster.connect import start_ray
from sflam.platform.assembly import Experiment
from sflam.platform.config import ExperimentConfig
from sflam.platform.errors import RunFailed, SflamError

Hook = Callable[[Any, int, int], None]  # (the backend, round, local step): test hooks of the driver's loop
ACTOR_FAILURES = (RayActorError,)


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


def _listed(resources: dict[str, float]) -> str:
    """A node's or cluster's resources as a user configures them (not Ray's per-node and per-group entries)."""
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())
                     if not k.startswith(("node:", "memory", "object_store_memory")) and "_group_" not in k
                     and not k.startswith("bundle_group"))


def connect(config: ExperimentConfig, needed_cpus: float) -> tuple[bool, str]:
    """Join RAY_ADDRESS (or ray.address) when set, else start a local cluster on 127.0.0.1.

    Returns whether this process started Ray (and so shuts it down) and a description of the cluster.
    """
    if ray.is_initialized():
        return False, "existing Ray session"
    env = {"env_vars": {"OMP_NUM_THREADS": str(config.ray.threads_per_worker), "TOKENIZERS_PARALLELISM": "false",
                        "HF_HUB_OFFLINE": "1"}}
    # failed calls the run has already reported in one line must not print tracebacks when their references drop
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    # a joined cluster (a job's own) keeps its runtime environment; num_cpus and env apply to a local start
    cpus = config.ray.local_cpus or max(os.cpu_count() or 1, math.ceil(needed_cpus))
    return True, start_ray(config.ray.address, num_cpus=cpus, runtime_env=env)


def start_watchdog() -> subprocess.Popen[bytes]:
    """A process outside this one's fate that ends the local cluster's processes if this driver is killed."""
    from ray._private.worker import _global_node  # the session folder names this cluster's processes

    session_dir = _global_node.get_session_dir_path() if _global_node is not None else ""
    return subprocess.Popen([sys.executable, "-m", "sflam.actors.watchdog", str(os.getpid()), session_dir],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


class ActorPool:
    """The actor pool of one experiment: edge workers and the server-part group, placed, loaded with the driver's
    built parts, awaited and replaced; the Ray backend (`sflam.actors.runtime`) runs the rounds on it."""

    def __init__(self, config: ExperimentConfig, experiment: Experiment | None = None,
                 hooks: dict[str, Hook] | None = None) -> None:
        self.config = config
        self.hooks = hooks or {}
        self.workers: list[Any] = []
        self.ranks: list[Any] = []
        self.log_dir = Path(config.output_dir).resolve() / config.name / "logs"
        self.watchdog: subprocess.Popen[bytes] | None = None
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
        if self.owns_ray and "local" in cluster:
            self.watchdog = start_watchdog()
        self.server_group: PlacementGroup | None = None
        try:
            self._start_pool(workers, ranks, cluster, experiment)
        except BaseException:  # nothing of a pool that could not start stays on the cluster
            self.shutdown()
            raise

    def _start_pool(self, workers: int, ranks: int, cluster: str, experiment: Experiment | None) -> None:
        config, rc, srv = self.config, self.config.ray, self.config.server
        K = config.train.devices_per_round
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
        self.replaced = 0
        self._start_actors(workers, ranks, experiment)

    def _start_actors(self, workers: int, ranks: int, experiment: Experiment | None) -> None:
        """Actors first, so their processes import torch and the model code while this driver builds the
        experiment; then the driver's data and built parts go to them through the object store, put once:
        no actor (nor any replacement) tokenizes, loads the fp32 model or quantizes again
        (docs/concepts/ray-runtime.md)."""
        srv = self.config.server
        self._edge_cls = ray.remote(EdgeWorker)
        self._server_cls = ray.remote(ServerRank)
        # a shape no node has fails at once; one that only has to wait for free resources gets the timeout
        self._check_feasible(self._rank_bundle(), "server rank", "server.resources / server.gpus_per_rank")
        self._check_feasible(self._edge_bundle(), "edge worker",
                             "ray.resources / ray.gpus_per_worker / ray.cpus_per_worker")
        # the server group first: its placement group reserves the ranks' nodes before edge workers fill them
        self.server_group = group = self._place_server_group(ranks)
        self.ranks = [self._server_cls.options(
            num_cpus=1, num_gpus=srv.gpus_per_rank, resources=dict(srv.resources), max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
        ).remote(self.config_dict, rank, ranks, self.log_file("server-rank", rank))
            for rank in range(ranks)]
        self.workers = [self._spawn_worker(i) for i in range(workers)]
        # while the actors start and import, the driver builds the experiment once
        self.exp = experiment or Experiment.build(self.config)
        self._ready([r.ready.remote() for r in self.ranks] + [w.ready.remote() for w in self.workers],
                    f"{ranks} server rank(s) and {workers} edge worker(s)")
        self.data_ref = ray.put(self.exp.data)
        self.device_part_ref = ray.put(self.exp.device.part)
        self.server_part_ref = ray.put(self.exp.server.part)
        self._ready([w.load.remote(*self._shared()) for w in self.workers]
                    + [r.load.remote(self.server_part_ref, self.exp.device.trains) for r in self.ranks],
                    f"loading the experiment into {ranks} server rank(s) and {workers} edge worker(s)")
        self.master: tuple[str, int] | None = None
        self.backend: str | None = None
        if srv.engine == "deepspeed":  # rank 0 names the meeting point on its own node; all ranks join there
            self.master = self._server_call(-1, "rendezvous", [self.ranks[0].rendezvous.remote()])[0]
            self.backend = self._server_call(-1, "start-up", [r.join.remote(*self.master) for r in self.ranks])[0]

    def _shared(self) -> tuple[Any, ...]:
        # the server part's reference travels inside a list: Ray resolves it only when a worker first evaluates
        return self.data_ref, self.device_part_ref, [self.server_part_ref]

    def _rank_bundle(self) -> dict[str, float]:
        srv = self.config.server
        return {"CPU": 1.0, **({"GPU": srv.gpus_per_rank} if srv.gpus_per_rank else {}),
                **{k: float(v) for k, v in srv.resources.items()}}

    def _edge_bundle(self) -> dict[str, float]:
        rc = self.config.ray
        return {"CPU": rc.cpus_per_worker, **({"GPU": rc.gpus_per_worker} if rc.gpus_per_worker else {}),
                **{k: float(v) for k, v in rc.resources.items()}}

    @staticmethod
    def _check_feasible(demand: dict[str, float], what: str, keys: str) -> None:
        """One line at once when no live node of the cluster could ever host one such actor."""
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(all(node.get(k, 0.0) >= v for k, v in demand.items()) for node in nodes):
            return
        offers = "; ".join(_listed(node) for node in nodes)
        raise SflamError(f"no node of the cluster can host a {what} needing {demand} ({keys}); its nodes offer: "
                         f"{offers}")

    def _place_server_group(self, ranks: int) -> PlacementGroup:
        """A placement group of one bundle per server rank, packed on few nodes or spread one per node."""
        srv = self.config.server
        bundle = self._rank_bundle()
        group = placement_group([dict(bundle) for _ in range(ranks)],
                                strategy="PACK" if srv.placement == "pack" else "SPREAD")
        ready, _ = ray.wait([group.ready()], timeout=self.config.ray.placement_timeout_s)
        if not ready:
            remove_placement_group(group)
            raise SflamError(f"the cluster cannot place {ranks} server rank(s) of {bundle} each "
                             f"(server.placement={srv.placement}) within ray.placement_timeout_s="
                             f"{self.config.ray.placement_timeout_s:g}; it has {self._resources()}")
        return group

    @staticmethod
    def _resources() -> str:
        return _listed(ray.cluster_resources())

    def _ready(self, refs: list[Any], what: str) -> None:
        """Wait for actors to be placed and built; one that is not within the timeout stops the run with one line."""
        rc = self.config.ray
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=rc.placement_timeout_s)
        if len(ready) < len(refs):
            raise SflamError(f"the cluster could not start {what} within ray.placement_timeout_s="
                             f"{rc.placement_timeout_s:g} ({len(refs) - len(ready)} not started; the cluster has "
                             f"{self._resources()}; each edge worker needs {self._edge_bundle()})")
        try:
            ray.get(ready)
        except (RayActorError, RayTaskError) as exc:
            raise SflamError(f"{what} failed to start: {self._cause(exc)}") from None

    def log_file(self, kind: str, index: int) -> str:
        """Where an actor writes the tracebacks of its failures (on the node it runs on)."""
        return str(self.log_dir / f"{kind}-{index}.log")

    def _new_worker(self, i: int) -> Any:
        """An edge worker, spread over the nodes by default; a replacement lands on whichever node can host it."""
        worker = self._spawn_worker(i)
        worker.load.remote(*self._shared())  # calls on an actor run in order: every later call sees it loaded
        return worker

    def _spawn_worker(self, i: int) -> Any:
        rc = self.config.ray
        return self._edge_cls.options(
            num_cpus=rc.cpus_per_worker, num_gpus=rc.gpus_per_worker, resources=dict(rc.resources),
            scheduling_strategy="SPREAD" if rc.placement == "spread" else "DEFAULT",
        ).remote(self.config_dict, rc.threads_per_worker, self.log_file("edge-worker", i))

    # ------------------------------------------------------------------ waiting: every result is awaited
    @staticmethod
    def _cause(exc: Exception) -> str:
        """One line for a failed call: the worker's own summary (naming its log file), else Ray's first line."""
        cause = getattr(exc, "cause", None)
        if isinstance(cause, WorkerError):
            return str(cause)[:600]
        first = (str(exc).splitlines() or [""])[0].strip()[:200]
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__

    def _fail(self, exc: Exception, where: str) -> RunFailed:
        return RunFailed(f"{where} failed: {self._cause(exc)}; the run stopped")

    def _gather(self, refs: dict[int, Any], recover: Callable[[int], Any], where: Callable[[int], str]
                ) -> dict[int, Any]:
        """Results of one call per worker; a worker that died is replaced and its call resubmitted,
        an exception inside a worker stops the run with one line (`where` names the round, step and devices)."""
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
                except RayTaskError as exc:
                    raise self._fail(exc, where(i)) from None
        return out

    def _await(self, refs: dict[int, Any], where: Callable[[int], str]) -> None:
        """Results of calls whose value nobody needs (start, backward): failures still stop the run. A worker
        that died here is replaced by the next call on it, which `_gather` sees."""
        for i, ref in refs.items():
            try:
                ray.get(ref)
            except ACTOR_FAILURES:
                pass
            except RayTaskError as exc:
                raise self._fail(exc, where(i)) from None

    def _replace(self, i: int, start_args: tuple[Any, ...], history: list[list[Any]],
                 slices: list[list[tuple[int, int]]]) -> None:
        try:
            ray.kill(self.workers[i])
        except Exception:  # it is already gone
            pass
        worker = self._new_worker(i)
        self.workers[i] = worker
        self.replaced += 1
        mine: list[list[Any]] = []
        if history:
            flat = ray.get([ref for step_refs in history for ref in step_refs])
            ranks = len(history[0])
            for s in range(len(history)):
                step_gradients = [g for shard in flat[s * ranks:(s + 1) * ranks] for g in shard]
                offset, count = slices[s][i]
                mine.append(step_gradients[offset:offset + count])
        ray.get(worker.replay.remote(mine, *start_args))  # top-level: Ray resolves the global adapter's reference

    def _server_call(self, round_index: int, what: str, refs: list[Any]) -> list[Any]:
        """Every rank's result; the first failure stops the run at once (the other ranks may be blocked in a
        collective with the lost one, so waiting for them in order could hang)."""
        try:
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready)
            return ray.get(refs)
        except (RayActorError, RayTaskError) as exc:
            where = what + (f" of round {round_index + 1}" if round_index >= 0 else "")
            raise RunFailed(f"the server part failed during {where} ({self._cause(exc)}); the run stopped") from None

    def shutdown(self) -> None:
        for actor in self.workers + self.ranks:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        if self.server_group is not None:
            try:
                remove_placement_group(self.server_group)
            except Exception:  # its cluster is already gone
                pass
        if self.owns_ray:
            ray.shutdown()
        if self.watchdog is not None:  # the cluster is gone: nothing left to guard
            self.watchdog.terminate()
            self.watchdog.wait()
