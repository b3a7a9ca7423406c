"""`sflam server` over PostgreSQL, and a tracking server that lets in only its users (issue 26).

A real `sflam db` PostgreSQL and two real MLflow servers on 127.0.0.1: one over the PostgreSQL `mlflow`
database with MLflow's basic-auth app, one over the default SQLite store. Requests without the admin's
credentials are refused (HTTP 401); the same run recorded on both shows the same in the UI's own API.
"""

from __future__ import annotations

import base64
import json
import socket
import stat
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sflam.cluster import tracking_server
from sflam.cluster.submit import job_credentials, runtime_env
from sflam.pipelines.train import train
from tests.cluster.servers import free_port, mlflow, postgres, sflam
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration


def request(url: str, body: dict[str, Any] | None = None, user: tuple[str, str] | None = None) -> tuple[int, Any]:
    """One real HTTP request; the status and the JSON answer (or the error's headers)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, {key.lower(): value for key, value in err.headers.items()}


def test_a_server_beyond_loopback_without_auth_does_not_start(tmp_path: Path) -> None:
    port = free_port()
    try:
        done = sflam("server", "start", "--dir", str(tmp_path), "--host", "0.0.0.0", "--port", str(port))
    finally:
        tracking_server.stop(tmp_path)  # had it started after all: through its process id
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("sflam server: error: --host 0.0.0.0 lets in anyone who reaches this machine: add --auth "
                           "(MLflow's basic-auth app, with admin credentials generated into "
                           "results/mlflow-auth/basic_auth.ini), or keep --host 127.0.0.1\n")
    assert not (tmp_path / "mlflow-server.json").exists() and not (tmp_path / "mlflow-auth").exists()
    with socket.socket() as sock:  # nothing listens there
        sock.bind(("0.0.0.0", port))


def test_backend_store_db_without_a_db_server_is_one_line(tmp_path: Path) -> None:
    try:
        done = sflam("server", "start", "--dir", str(tmp_path), "--port", str(free_port()), "--backend-store", "db")
    finally:
        tracking_server.stop(tmp_path)
    assert done.returncode == 2
    assert done.stderr == (f"sflam server: error: --backend-store db: no `sflam db` server runs for {tmp_path}; start "
                           f"one with `sflam db start --dir {tmp_path}`\n")


def test_postgres_store_with_basic_auth_lets_in_only_its_users_and_shows_the_runs_sqlite_shows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pg_results, lite_results = tmp_path / "pg" / "results", tmp_path / "lite"
    with postgres(pg_results) as db, mlflow(pg_results, backend="db", auth=True) as guarded, \
            mlflow(lite_results) as plain:
        assert guarded.auth and guarded.backend_store_uri == db.url("mlflow")
        auth_dir = pg_results / "mlflow-auth"
        for path in (auth_dir / "basic_auth.ini", auth_dir / "basic_auth.db"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        creds = tracking_server.credentials(pg_results)
        admin = (creds["MLFLOW_TRACKING_USERNAME"], creds["MLFLOW_TRACKING_PASSWORD"])
        assert admin[0] == "admin" and len(admin[1]) >= 24

        # who gets in: real requests to the REST API and to the UI's own API
        search = f"{guarded.uri}/api/2.0/mlflow/experiments/search?max_results=5"
        status, headers = request(search)
        assert status == 401 and headers["www-authenticate"] == 'Basic realm="mlflow"'
        assert request(search, user=(admin[0], admin[1] + "x"))[0] == 401
        assert request(search, user=admin)[0] == 200
        assert request(f"{guarded.uri}/ajax-api/2.0/mlflow/runs/search", {"experiment_ids": ["0"]})[0] == 401

        # a run reads its credentials from the environment, as `sflam submit` passes them to a job
        assert runtime_env(pg_results, False, guarded.uri, creds)["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == admin[1]
        for name, value in creds.items():
            monkeypatch.setenv(name, value)
        runs = {}
        for server, out in ((guarded, pg_results), (plain, lite_results)):
            config = tiny_config(f"tracking.uri={server.uri}", f"output_dir={out}", "train.rounds=2",
                                 "train.eval_every=1", "name=same-run", "seed=3")
            result = train(config)
            status, answer = request(f"{server.uri}/ajax-api/2.0/mlflow/experiments/get-by-name?"
                                     "experiment_name=same-run", user=admin)
            assert status == 200
            experiment = answer["experiment"]
            status, found = request(f"{server.uri}/ajax-api/2.0/mlflow/runs/search",
                                    {"experiment_ids": [experiment["experiment_id"]]}, user=admin)
            assert status == 200 and [r["info"]["run_id"] for r in found["runs"]] == [result.mlflow_run_id]
            runs[server.uri] = (experiment, found["runs"][0])

        (pg_experiment, pg_run), (lite_experiment, lite_run) = runs[guarded.uri], runs[plain.uri]
        for experiment in (pg_experiment, lite_experiment):  # both open in MLflow's model-training view
            assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
        for run in (pg_run, lite_run):
            assert run["info"]["run_name"] == "same-run (seed 3)" and run["info"]["status"] == "FINISHED"

        def shown(run: dict[str, Any], part: str) -> dict[str, Any]:
            return {item["key"]: item["value"] for item in run["data"].get(part, [])}

        where = {"tracking.uri", "output_dir"}  # the two settings that differ by design
        pg_params, lite_params = shown(pg_run, "params"), shown(lite_run, "params")
        assert pg_params.keys() == lite_params.keys() and len(pg_params) > 50
        assert {k: v for k, v in pg_params.items() if k not in where} == \
            {k: v for k, v in lite_params.items() if k not in where}
        pg_metrics, lite_metrics = ({m["key"]: (m["value"], m["step"]) for m in r["data"]["metrics"]}
                                    for r in (pg_run, lite_run))
        assert pg_metrics.keys() == lite_metrics.keys() and "round_latency_s" in pg_metrics
        assert pg_metrics["round_latency_s"] == lite_metrics["round_latency_s"]

        # the runs really live in PostgreSQL, and the job gets the admin for this server from its results folder
        with psycopg.connect(host="127.0.0.1", port=db.port, dbname="mlflow", user="sflam",
                             passfile=str(db.password_file)) as conn:
            names = [row[0] for row in conn.execute("SELECT name FROM runs")]
        assert names == ["same-run (seed 3)"]
        for name in creds:
            monkeypatch.delenv(name)
        assert job_credentials(guarded.uri, tmp_path / "pg") == creds  # `sflam submit` from tmp_path/pg
        assert job_credentials(plain.uri, tmp_path / "pg") == {} and job_credentials(guarded.uri, tmp_path) == {}
