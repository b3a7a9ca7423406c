"""Parallel trials: `study.parallel` at a time as Ray tasks on the study's cluster, each recording its own
heartbeat; the driver records finished trials in MLflow and tells Optuna (only the driver talks to MLflow)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import TrialState

from sflam.cluster import database
from sflam.cluster.connect import start_ray
from sflam.pipelines.train import record, run_experiment
from sflam.platform.build import validate
from sflam.platform.config import ExperimentConfig
from sflam.platform.errors import SflamError
from sflam.platform.results import RunResult
from sflam.platform.tracking import Tracker
from sflam.search.space import suggest, trial_config
from sflam.search.storage import trial_storage
from sflam.search.trials import NODE_ATTR, ask, fail_stale, queued, tell, trial_tags, trial_values


def alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


@contextmanager
def study_cluster(config: ExperimentConfig) -> Iterator[int]:
    """The Ray cluster parallel trials run on (joined, or started and shut down here); yields its live nodes."""
    if config.study.parallel == 1:
        yield 1
        return
    import ray

    owns_ray = not ray.is_initialized()
    if owns_ray:
        start_ray(config.ray.address, num_cpus=config.ray.local_cpus or None)
    try:
        yield alive_nodes()
    finally:
        if owns_ray:
            ray.shutdown()


@dataclass(frozen=True)
class TrialTask:
    """What a trial's Ray task needs to record its heartbeat in the study's storage."""

    url: str
    trial_id: int
    heartbeat_interval: int
    password: str | None  # for a node without the `sflam db` password file; never logged


def _remote_trial(config_dict: dict[str, Any], task: TrialTask | None) -> RunResult:
    """A trial on a Ray worker: its heartbeat from this process while it runs, the result to the driver."""
    from sflam.platform.config import config_from_dict

    config = config_from_dict(config_dict)
    if task is None:  # a journal storage: no heartbeat
        return run_experiment(config)
    import ray

    storage = trial_storage(task.url, task.heartbeat_interval, task.password)
    try:
        storage.record_heartbeat(task.trial_id)  # first, so a trial that has a node has a heartbeat
        storage.set_trial_user_attr(task.trial_id, NODE_ATTR, ray.get_runtime_context().get_node_id())
        beat = get_heartbeat_thread(task.trial_id, storage)
        beat.start()
        try:
            return run_experiment(config)
        finally:
            beat.join()
    finally:
        storage.engine.dispose()  # its connections go back to the server now, not when the worker exits


@dataclass
class Flight:
    trial: optuna.trial.Trial
    config: ExperimentConfig
    retry_of: int | None


def run_parallel(config: ExperimentConfig, study: optuna.Study, parent: Tracker, target: Path,
                  say: Callable[[str], None], url: str) -> None:
    """Ask-and-tell with `study.parallel` trials in flight as Ray tasks; the driver records and tells.

    A task that dies with its worker or node (a Ray system error, not the trial's own exception) leaves
    its trial to the heartbeat: once it is FAIL, Optuna's retry callback has queued a copy, which the
    next ask returns. A finished task's trial beats from this process until it is told, recorded one at
    a time between asks, so no trial waits unbeaten while others are recorded."""
    import ray

    heartbeat = is_heartbeat_enabled(study._storage)
    backend = getattr(study._storage, "_backend", study._storage)  # reads past the driver's trial cache
    password = database.password_of(url) if heartbeat else None
    # no retry by Ray: a lost trial is Optuna's to fail and retry, so the study records it
    task = ray.remote(num_cpus=1, max_retries=0)(_remote_trial)
    running: dict[Any, Flight] = {}
    done: list[tuple[Flight, RunResult, Any]] = []  # finished on Ray, not yet recorded: (trial, result, heartbeat)
    lost: dict[int, Flight] = {}
    fresh = 0
    while True:
        fail_stale(study)  # lost trials (ours, an earlier driver's): FAIL once their heartbeat lapses, and queued
        if lost:
            for trial_id in [t for t in lost if backend.get_trial(t).state != TrialState.RUNNING]:
                say(f"trial {lost.pop(trial_id).trial.number}: FAIL (no heartbeat for {config.study.grace_period} s: "
                    "its worker or node was lost)")
        waiting = queued(study)
        while len(running) + len(done) < config.study.parallel and (fresh < config.study.trials or waiting):
            trial, retry_of = ask(study)
            fresh += int(retry_of is None)
            waiting -= int(retry_of is not None)
            try:
                cfg = trial_config(config, suggest(trial, config.study.space), trial.number)
                validate(cfg)
            except SflamError as exc:
                say(f"trial {trial.number}: FAIL ({exc})")
                study.tell(trial, state=TrialState.FAIL)
                continue
            again = f" (retry of trial {retry_of})" if retry_of is not None else ""
            say(f"trial {trial.number}{again}: started on Ray")
            spec = TrialTask(url, trial._trial_id, config.study.heartbeat_interval, password) if heartbeat else None
            running[task.remote(cfg.to_dict(), spec)] = Flight(trial, cfg, retry_of)
        if not running and not done:
            if not lost and not waiting and fresh >= config.study.trials:
                return
            time.sleep(1.0)  # only lost trials left: wait for their heartbeat to lapse
            continue
        if running:
            # wait only when nothing is left to record; then take every task that has ended
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0 if done else 1.0 if lost else None)
            if ready:
                ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
            for ref in ready:
                flight = running.pop(ref)
                result = _collect(study, say, ref, flight, lost, backend)
                if result is not None:  # this process works on it now: its heartbeat goes on from here
                    beat = get_heartbeat_thread(flight.trial._trial_id, study._storage)
                    beat.start()
                    done.append((flight, result, beat))
        if done:
            flight, result, beat = done.pop(0)
            try:
                _record(config, study, parent, target, say, flight, result)
            finally:
                beat.join()


def _collect(study: optuna.Study, say: Callable[[str], None], ref: Any, flight: Flight, lost: dict[int, Flight],
             backend: Any) -> RunResult | None:
    """A finished task's result; its trial's own error is its FAIL, a lost worker leaves it to its heartbeat."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    trial = flight.trial
    try:
        return ray.get(ref)
    except RayTaskError as exc:  # the trial's own error: its FAIL
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        first = str(cause).splitlines()[0][:200] if str(cause) else ""
        say(f"trial {trial.number}: FAIL ({type(cause).__name__}: {first})")
        trial.set_user_attr("error", f"{type(cause).__name__}: {cause}"[:1000])
        tell(study, trial, say, state=TrialState.FAIL)
    except RayError as exc:  # its worker or node died
        if not is_heartbeat_enabled(study._storage):
            say(f"trial {trial.number}: FAIL ({type(exc).__name__}: its worker was lost)")
            tell(study, trial, say, state=TrialState.FAIL)
            return None
        if NODE_ATTR not in backend.get_trial(trial._trial_id).user_attrs:
            backend.record_heartbeat(trial._trial_id)  # it never started: let its heartbeat lapse from now
        say(f"trial {trial.number}: its worker was lost ({type(exc).__name__}); it fails when its heartbeat lapses")
        lost[trial._trial_id] = flight
    return None


def _record(config: ExperimentConfig, study: optuna.Study, parent: Tracker, target: Path, say: Callable[[str], None],
            flight: Flight, result: RunResult) -> None:
    """Record a finished trial as a child MLflow run and tell Optuna its values."""
    trial, cfg = flight.trial, flight.config
    try:
        record(result, cfg, run_name=f"trial-{trial.number}", parent_run_id=parent.run_id,
               out_dir=target / f"trial{trial.number}", experiment_name=config.tracking.experiment or config.name,
               tags=trial_tags(study.study_name, trial, flight.retry_of))
        values = trial_values(config, result)
        trial.set_user_attr("mlflow_run_id", result.mlflow_run_id)
    except Exception as exc:
        say(f"trial {trial.number}: FAIL ({type(exc).__name__})")
        tell(study, trial, say, state=TrialState.FAIL)
        return
    if tell(study, trial, say, values if len(values) > 1 else values[0]):
        say(f"trial {trial.number}: done")
