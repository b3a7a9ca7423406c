"""A study across a real multi-node Ray cluster against PostgreSQL, with a node lost mid-trial (issue 26).

`ray.cluster_utils.Cluster` runs a head and three worker nodes (2 CPUs each) on 127.0.0.1; `sflam db`
and an MLflow server over its `mlflow` database run beside them. `sflam study` joins the cluster in its
own process with `study.parallel=8`: PostgreSQL is the default storage there (no study.storage given),
every trial records its heartbeat from its own node. While the study runs, this test waits for a trial
running on a worker node and kills that node. The trials it had must end FAIL by heartbeat and run
again elsewhere, and at the end no trial is RUNNING or WAITING and every completed trial has its child
run in the PostgreSQL-backed MLflow server. Everything is stopped by its own process id.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from ray.cluster_utils import Cluster

from sflam.actors.runtime import start_watchdog
from sflam.cluster.connect import LOOPBACK, _loopback_node, start_ray
from sflam.search.storage import open_storage
from tests.cluster.servers import ROOT, mlflow, postgres, sflam

pytestmark = pytest.mark.integration

TRIALS, PARALLEL, GRACE = 16, 8, 6
# tiny trials: a random 4-layer Llama on the synthetic task, two rounds of two devices
TINY = ["quant.weights=fp32", "train.rounds=2", "train.eval_every=2", "train.devices_per_round=2",
        "data.num_devices=8", "data.synthetic_samples=240", "data.eval_samples=32", "train.local_steps=2",
        "study.space={split.cut_layer: {type: int, low: 1, high: 3}, allocation.lam: {type: float, low: 0.1, "
        "high: 0.9}}", "study.sampler=random"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """A head and three worker nodes, 2 CPUs each: eight trials at once, on four raylets."""
    # every node on the loopback interface: Ray's processes bind to their node's address
    with pytest.MonkeyPatch.context() as patch, _loopback_node():
        patch.setenv("OMP_NUM_THREADS", "1")  # the nodes' workers share this machine's two cores
        patch.delenv("RAY_ADDRESS", raising=False)
        loopback = {"node_ip_address": LOOPBACK, "num_cpus": 2}
        nodes = Cluster(initialize_head=True, head_node_args={**loopback, "include_dashboard": False})
        watchdog = None
        try:
            workers = [nodes.add_node(**loopback) for _ in range(3)]
            nodes.wait_for_nodes()
            assert nodes.address.startswith(f"{LOOPBACK}:")
            start_ray(nodes.address)  # this process only watches: the study is another process's driver
            watchdog = start_watchdog()  # pytest killed: the nodes' raylets and workers go with it
            yield {"cluster": nodes, "workers": workers, "address": nodes.address}
        finally:
            ray.shutdown()
            nodes.shutdown()
            if watchdog is not None:
                watchdog.terminate()
                watchdog.wait()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`sflam db` and an MLflow server over its `mlflow` database, for one results folder."""
    results = tmp_path_factory.mktemp("results")
    with postgres(results) as db, mlflow(results, backend="db") as server:
        yield {"results": results, "db": db, "mlflow": server}


def study_command(results: Path, address: str, tracking_uri: str, name: str) -> list[str]:
    return [sys.executable, "-m", "sflam", "study", "-c", str(ROOT / "configs" / "study-smoke.yaml"), f"name={name}",
            f"output_dir={results}", f"ray.address={address}", f"tracking.uri={tracking_uri}",
            f"study.trials={TRIALS}", f"study.parallel={PARALLEL}", "study.heartbeat_interval=1",
            f"study.grace_period={GRACE}", *TINY]


def running_on(storage: Any, name: str, node_ids: set[str]) -> list[optuna.trial.FrozenTrial]:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # not created yet
        return []
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("sflam.node") in node_ids]


def test_a_study_on_four_nodes_loses_a_node_and_every_trial_ends_complete_or_fail(cluster, stores) -> None:
    results, db, server = stores["results"], stores["db"], stores["mlflow"]
    name = "pg-cluster"
    started = time.monotonic()
    proc = subprocess.Popen(study_command(results, cluster["address"], server.uri, name), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        storage = open_storage(db.url("optuna"))
        workers = {node.node_id: node for node in cluster["workers"]}
        victims: list[optuna.trial.FrozenTrial] = []
        deadline = time.monotonic() + 240
        while not victims and proc.poll() is None and time.monotonic() < deadline:
            victims = running_on(storage, name, set(workers))
            time.sleep(0.1)
        assert victims, "no trial was seen running on a worker node"
        node_id = victims[0].user_attrs["sflam.node"]
        cluster["cluster"].remove_node(workers[node_id], allow_graceful=False)  # a crash: no goodbye
        lost_at = time.time()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    wall = time.monotonic() - started
    assert proc.returncode == 0, err[-3000:]

    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert set(states) <= {TrialState.COMPLETE, TrialState.FAIL}
    fresh = [t for t in trials if "failed_trial" not in t.system_attrs]
    retries = {t.system_attrs["failed_trial"]: t for t in trials if "failed_trial" in t.system_attrs}
    assert len(fresh) == TRIALS
    # the trials the lost node was running: FAIL by heartbeat, each run once more elsewhere, and completed
    lost = [t for t in trials if t.state == TrialState.FAIL]
    described = [(t.number, t.state.name, t.user_attrs.get("sflam.node", "-")[:8], t.system_attrs.get("failed_trial"))
                 for t in trials]
    # the trials seen running on the node that was removed (others seen running then, on other workers, go on)
    assert {v.number for v in victims if v.user_attrs["sflam.node"] == node_id} <= {t.number for t in lost}, described
    for trial in lost:
        # on the lost node, or lost before its task named its node (its heartbeat had begun)
        assert trial.user_attrs.get("sflam.node") in (node_id, None), described
        assert "mlflow_run_id" not in trial.user_attrs
        assert trial.datetime_complete is not None
        failed_after = trial.datetime_complete.timestamp() - lost_at
        assert failed_after >= GRACE - 2  # FAIL because its heartbeat lapsed, not because Ray said so
        retry = retries[trial.number]
        assert retry.state == TrialState.COMPLETE and retry.user_attrs["sflam.node"] != node_id
        assert retry.params == trial.params
        assert f"trial {trial.number}: FAIL (no heartbeat for {GRACE} s" in err
    assert set(retries) == {t.number for t in lost}, described  # nothing else was retried
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == TRIALS and len(trials) == TRIALS + len(lost)
    assert len({t.user_attrs["sflam.node"] for t in complete}) >= 3  # the trials ran across the nodes

    # every completed trial is a child run in the PostgreSQL-backed MLflow server, under the study's parent
    client = MlflowClient(server.uri)
    parents = client.search_runs([client.get_experiment_by_name(name).experiment_id],
                                 filter_string=f"attributes.run_name = '{name}-study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    for trial in complete:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.info.run_name == f"trial-{trial.number} (seed 0)"
        assert float(run.data.metrics["final_accuracy"]) == pytest.approx(trial.values[0])
    print(f"\n{TRIALS} trials + {len(lost)} retried on 4 nodes (parallel {PARALLEL}) against PostgreSQL: "
          f"{wall:.0f} s wall", file=sys.stderr)
    assert sflam("db", "status", "--dir", str(results)).returncode == 0


@pytest.mark.parametrize("storage", ["sqlite", None])
def test_a_study_on_several_nodes_without_a_database_server_is_refused_in_one_line(cluster, tmp_path: Path,
                                                                                   storage: str | None) -> None:
    given = [f"study.storage=sqlite:///{tmp_path}/optuna.db"] if storage else []
    live = sum(1 for node in ray.nodes() if node.get("Alive"))  # 4, or 3 after the node-loss test removed one
    done = sflam("study", "-c", str(ROOT / "configs" / "study-smoke.yaml"), f"output_dir={tmp_path}",
                 f"ray.address={cluster['address']}", f"study.parallel={PARALLEL}", *given, *TINY)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    # one line, the last (before it only Ray's own lines about joining the cluster)
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if "error" in line.lower()] == lines[-1:]
    if storage:
        assert lines[-1] == (f"sflam study: error: study.storage=sqlite:///{tmp_path}/optuna.db: a SQLite file cannot "
                            f"serve study.parallel={PARALLEL} on {live} nodes (their trials record heartbeats from "
                            f"every node); start PostgreSQL with `sflam db start --dir {tmp_path}` and leave "
                            "study.storage unset")
    else:
        assert lines[-1] == (f"sflam study: error: study.parallel={PARALLEL} on a cluster of {live} nodes needs a "
                            f"database server every node reaches: start one with `sflam db start --dir {tmp_path}` "
                            "(then it is the default), or set study.storage=postgresql://...")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no MLflow run, no trial
