"""Stores benchmark: one multi-node study against PostgreSQL and against a single SQLite file, side by side.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stores.py [--trials 16] [--parallel 8] [--repeats 2]
     [--stores postgresql sqlite]
Writes benchmarks/results/stores.md.

The workload of tests/search/test_study_cluster.py: a `ray.cluster_utils.Cluster` of a head and three
worker nodes (2 CPUs each, all on 127.0.0.1), a study of --trials tiny trials (a random 4-layer Llama
on the synthetic task, two rounds of two devices) with --parallel in flight, trials recording their
heartbeats from their nodes every second (grace period 6 s), and one worker node killed while it runs a
trial. Each store gets a fresh cluster and fresh servers: PostgreSQL = Optuna on `sflam db` and MLflow
on its `mlflow` database; SQLite = Optuna on one SQLite file and MLflow on the default SQLite store
(every node of this one-machine cluster shares the disk, which a real cluster's nodes do not: `sflam
study` refuses this set-up there, the benchmark lets it run). This process is the study's driver.

Figures: wall time of the study; trials by state at the end; trials lost with the node and retried;
errors: the driver's, and lines of the nodes' worker logs naming a database error ("database is
locked", OperationalError); how parallel the trials ran (mean trials in flight over the study, from
their start and end times in the storage).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from sflam.cluster import database, tracking_server  # noqa: E402
from sflam.cluster.connect import LOOPBACK, _loopback_node  # noqa: E402
from sflam.platform.build import quiet_libraries  # noqa: E402
from sflam.platform.config import load_config  # noqa: E402
from sflam.search.storage import open_storage  # noqa: E402
from sflam.search.study import run_study  # noqa: E402
from tests.cluster.servers import free_port  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
GRACE = 6
TINY = ["quant.weights=fp32", "train.rounds=2", "train.eval_every=2", "train.devices_per_round=2",
        "data.num_devices=8", "data.synthetic_samples=240", "data.eval_samples=32", "train.local_steps=2",
        "study.space={split.cut_layer: {type: int, low: 1, high: 3}, allocation.lam: {type: float, low: 0.1, "
        "high: 0.9}}", "study.sampler=random", "study.heartbeat_interval=1", f"study.grace_period={GRACE}"]
DB_ERRORS = ("database is locked", "OperationalError", "too many clients", "server closed the connection")


def kill_a_busy_node(cluster: Any, storage_url: str, name: str, stop: threading.Event, out: dict[str, Any]) -> None:
    """Wait for a trial running on a worker node, then kill that node (no graceful shutdown)."""
    storage = open_storage(storage_url)
    workers = {node.node_id: node for node in cluster.worker_nodes}
    while not stop.is_set():
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            busy = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if t.user_attrs.get("sflam.node") in workers]
        except Exception:  # not created yet, or the store is busy
            busy = []
        if busy:
            node_id = busy[0].user_attrs["sflam.node"]
            cluster.remove_node(workers[node_id], allow_graceful=False)
            out.update(node=node_id, at=time.time(), victim=busy[0].number)
            return
        time.sleep(0.1)


def worker_log_errors(session_dir: Path) -> dict[str, int]:
    counts = dict.fromkeys(DB_ERRORS, 0)
    for path in (session_dir / "logs").glob("worker-*.err"):
        text = path.read_text(errors="replace")
        for needle in DB_ERRORS:
            counts[needle] += text.count(needle)
    return counts


def in_flight(trials: list[optuna.trial.FrozenTrial], wall_s: float) -> tuple[float, int]:
    """Mean trials in flight over the study (busy trial-seconds / wall seconds) and the most at once."""
    spans = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in trials
             if t.datetime_start is not None and t.datetime_complete is not None]
    busy = sum(end - start for start, end in spans)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return busy / wall_s, most


def one_store(store: str, trials: int, parallel: int, work: Path) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    results = work / store
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    name = f"stores-{store}"
    db = None
    if store == "postgresql":
        db, _ = database.start(results, port=free_port())
    server = None
    row: dict[str, Any] = {"store": store}
    try:
        server, _ = tracking_server.start(results, port=free_port(), backend="db" if db is not None else None)
        storage_url = db.url("optuna") if db is not None else f"sqlite:///{results / 'optuna.db'}"
        with _loopback_node():
            cluster = Cluster(initialize_head=True, head_node_args={"node_ip_address": LOOPBACK, "num_cpus": 2,
                                                                   "include_dashboard": False})
            try:
                for _ in range(3):
                    cluster.add_node(node_ip_address=LOOPBACK, num_cpus=2)
                cluster.wait_for_nodes()
                session = Path(cluster.head_node.get_session_dir_path())
                config = load_config(ROOT / "configs" / "study-smoke.yaml", [
                    f"name={name}", f"output_dir={results}", f"ray.address={cluster.address}",
                    f"tracking.uri={server.uri}", f"study.trials={trials}", f"study.parallel={parallel}",
                    f"study.storage={storage_url}", *TINY])
                stop, killed = threading.Event(), {}
                monitor = threading.Thread(target=kill_a_busy_node, args=(cluster, storage_url, name, stop, killed))
                monitor.start()
                said: list[str] = []
                started = time.monotonic()
                try:
                    run_study(config, announce=said.append, sqlite_on_cluster=True)
                    row["driver_error"] = ""
                except Exception as exc:
                    row["driver_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    print(f"the study's driver failed: {exc}", file=sys.stderr, flush=True)
                row["wall_s"] = time.monotonic() - started
                stop.set()
                monitor.join()
                row["worker_log_errors"] = worker_log_errors(session)
            finally:
                cluster.shutdown()
        found = optuna.load_study(study_name=name, storage=open_storage(storage_url)).get_trials(deepcopy=False)
        states = [t.state for t in found]
        row.update({state.name: states.count(state) for state in TrialState})
        row["trials"] = len(found)
        row["killed_node_trial"] = killed.get("victim")
        row["retries"] = sum(1 for t in found if "failed_trial" in t.system_attrs)
        row["retries_complete"] = sum(1 for t in found if "failed_trial" in t.system_attrs
                                      and t.state == TrialState.COMPLETE)
        row["fail_not_on_lost_node"] = sum(1 for t in found if t.state == TrialState.FAIL
                                           and t.user_attrs.get("sflam.node") not in (killed.get("node"), None))
        row["trial_fail_lines"] = sum(1 for line in said if ": FAIL (" in line and "no heartbeat" not in line)
        row["late_results"] = sum(1 for line in said if "came after it was marked FAIL" in line)
        row["mean_in_flight"], row["most_in_flight"] = in_flight(found, row["wall_s"])
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        runs = {t.user_attrs.get("mlflow_run_id") for t in found if t.state == TrialState.COMPLETE}
        row["mlflow_child_runs"] = sum(1 for run_id in runs if run_id and client.get_run(run_id).info.status
                                       == "FINISHED")
    finally:
        if server is not None:
            tracking_server.stop(results)
        if db is not None:
            database.stop(results)
    return row


def table(rows: list[dict[str, Any]], trials: int, parallel: int, repeats: int) -> str:
    lines = [f"# Stores: a {trials}-trial study, {parallel} in flight, on 4 nodes, one node killed mid-trial", "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stores.py "
             f"--trials {trials} --parallel {parallel} --repeats {repeats}` (each store {repeats} times, in "
             "alternating order; this machine: 2 cores shared with other work, 24 GiB).", "",
             "| store (run) | wall (s) | trials | COMPLETE | FAIL | RUNNING | WAITING | retried (complete) | "
             "FAIL not from the lost node | late results | mean / most in flight | MLflow child runs | "
             "database errors in worker logs | driver error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in r["worker_log_errors"].items() if v) or "none"
        lines.append(f"| {r['store']} ({r['run']}) | {r['wall_s']:.0f} | {r['trials']} | {r['COMPLETE']} | "
                     f"{r['FAIL']} | {r['RUNNING']} | {r['WAITING']} | {r['retries']} ({r['retries_complete']}) | "
                     f"{r['fail_not_on_lost_node']} | {r['late_results']} | "
                     f"{r['mean_in_flight']:.1f} / {r['most_in_flight']} | {r['mlflow_child_runs']} | {errors} | "
                     f"{r['driver_error'] or 'none'} |")
    lines += ["", "FAIL not from the lost node: trials marked FAIL while their node lived (a heartbeat that could not "
              "be written in time, or the trial's own error). Late results: trials whose result reached the driver "
              "after they had been marked FAIL. In flight: trials running at once, from their start and end times in "
              "the storage (a lost trial counts until it is marked FAIL, so the most exceeds the parallelism while "
              "its retry runs).",
              "", "SQLite runs here only because every node of this one-machine cluster shares its disk; on a real "
              "cluster the nodes cannot open the driver's file, and `sflam study` refuses a SQLite storage with "
              "study.parallel > 1 on several nodes."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--stores", nargs="+", default=["postgresql", "sqlite"], choices=["postgresql", "sqlite"])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each store, in alternating order")
    args = parser.parse_args()
    quiet_libraries()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.pop("RAY_ADDRESS", None)
    work = OUT / "stores-work"
    rows = []
    for repeat in range(args.repeats):  # alternating order: a busy spell of the shared machine hits both
        for store in args.stores if repeat % 2 == 0 else list(reversed(args.stores)):
            print(f"== {store}, run {repeat + 1}", flush=True)
            rows.append({**one_store(store, args.trials, args.parallel, work), "run": repeat + 1})
            print(rows[-1], flush=True)
    rows.sort(key=lambda r: (args.stores.index(r["store"]), r["run"]))
    OUT.mkdir(parents=True, exist_ok=True)
    text = table(rows, args.trials, args.parallel, args.repeats)
    (OUT / "stores.md").write_text(text)
    shutil.rmtree(work, ignore_errors=True)
    print(text)


if __name__ == "__main__":
    main()
