"""Jobs on a real Ray head (127.0.0.1): `ray job submit --working-dir .` and `sflam submit`, found in MLflow."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` in its own session, stopped through its process id."""
    port, dashboard = free_port(), free_port()
    # token authentication, with a token of this test's own for the head and every client
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    temp = tmp_path_factory.mktemp("ray")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=4",
         "--disable-usage-stats", f"--temp-dir={temp}", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 180
    while True:
        try:
            JobSubmissionClient(address, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}).list_jobs()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError("the Ray head did not come up") from None
            time.sleep(1)
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    while True:  # the job agent comes up after the dashboard: wait until a trivial job runs
        try:
            probe = client.submit_job(entrypoint="python -c pass")
            break
        except RuntimeError:
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
            time.sleep(1)
    while client.get_job_status(probe).value not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(0.5)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def finished_run(store: Path, name: str):
    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{name} (seed 0)'")
    assert len(runs) == 1
    return client, runs[0]


def test_ray_job_submit_and_sflam_submit(ray_head, tmp_path: Path) -> None:
    address, env = ray_head
    store = tmp_path / "mlflow.db"
    common = ["-c", "configs/smoke.yaml", f"output_dir={tmp_path}", f"tracking.uri=sqlite:///{store}",
              "train.rounds=2", "train.eval_every=2"]
    plain = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
         "python", "-m", "sflam", "run", *common, "name=via-ray-job"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-2000:]
    assert "succeeded" in (plain.stdout + plain.stderr).lower()
    client, run = finished_run(store, "via-ray-job")
    assert len(client.get_metric_history(run.info.run_id, "round_latency_s")) == 2

    ours = subprocess.run(
        [sys.executable, "-m", "sflam", "submit", "--address", address, "--", "run", *common, "name=via-sflam-submit",
         "runtime=ray", "ray.workers=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr[-2000:]
    assert "SUCCEEDED" in ours.stderr and "ray pool: 1 edge worker" in ours.stdout
    client, run = finished_run(store, "via-sflam-submit")
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "accuracy")) == 1

    failing = subprocess.run(
        [sys.executable, "-m", "sflam", "submit", "--address", address, "--", "run", *common, "split.cut_layer=99"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert failing.returncode == 1 and "FAILED" in failing.stderr
