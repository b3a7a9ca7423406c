"""The cluster walk-through, run as written against a real token-authenticated head on 127.0.0.1 (issue 14).

The first ```bash block after "## Running on a Ray cluster" in docs/how-to/cluster.md runs line by line in
one bash process, in a scratch copy of the repository (so `results/` is this test's own), from a fresh
environment with a private home (the Ray token) and a private Ray temp folder. Only the port numbers change:
the machine is shared, so the head, its dashboard and agent, and the MLflow server take free ports instead of
6379, 8265, 52365 and 5000. The runs are then looked up through the tracking server the walk-through's UI
address points at. The server is stopped by `sflam server stop` from the walk-through (through its process
id), and every Ray process this test started is ended by its process id (never `ray stop`, which would
stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
WALKTHROUGH = Path("docs") / "how-to" / "cluster.md"
HEADING = "\n## Running on a Ray cluster\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def readme_blocks() -> list[list[str]]:
    """The ```bash blocks of the walk-through's section, as command lines (comments stripped)."""
    text = (ROOT / WALKTHROUGH).read_text()
    assert HEADING in text, f"{WALKTHROUGH} has no '{HEADING.strip()}' section"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2, f"{WALKTHROUGH}'s section needs the walk-through block and the stop block"
    out = []
    for block in blocks:
        lines = []
        for raw in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", raw).strip()  # a trailing comment, outside quotes in these lines
            if line and not line.startswith("#"):
                lines.append(line)
        out.append(lines)
    return out


@dataclass
class Walkthrough:
    repo: Path
    env: dict[str, str]
    lines: list[str]
    stop_lines: list[str]
    tracking_uri: str
    dashboard: str
    proc: subprocess.CompletedProcess[str]
    elapsed_s: float


def ours(env_key: str, value: str) -> list[psutil.Process]:
    """Every process whose environment carries this test's private value (its Ray temp folder)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(env_key) == value:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def end_by_pid(processes: list[psutil.Process]) -> None:
    for proc in processes:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def walkthrough() -> Iterator[Walkthrough]:
    blocks = readme_blocks()
    lines, stop_lines = blocks[0], blocks[1]
    assert any(line.startswith("ray start --head") for line in lines)
    scratch = Path(tempfile.mkdtemp(prefix="sfw", dir="/tmp"))  # short: Ray's sockets live under it
    repo, home, ray_tmp = scratch / "repo", scratch / "home", scratch / "t"
    home.mkdir()
    ray_tmp.mkdir()
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    # `source .venv/bin/activate` must find the project's environment: its activate script, which points there
    (repo / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(ROOT / ".venv" / "bin" / "activate", repo / ".venv" / "bin" / "activate")

    gcs, dashboard, agent, mlflow_port = free_port(), free_port(), free_port(), free_port()
    commands = []
    for line in lines:
        line = line.replace("127.0.0.1:8265", f"127.0.0.1:{dashboard}").replace("127.0.0.1:5000",
                                                                                f"127.0.0.1:{mlflow_port}")
        if line.startswith("ray start --head"):
            line += f" --port={gcs} --dashboard-port={dashboard} --dashboard-agent-listen-port={agent}"
        if line.startswith("sflam server start"):
            line += f" --port {mlflow_port}"
        commands.append(line)
    stop_lines = [line for line in stop_lines if line.startswith("sflam server stop")]
    # a fresh shell: no virtual environment on PATH, no Ray or MLflow settings inherited from this process
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RAY_", "MLFLOW_", "VIRTUAL_ENV")) and key != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT)))
    env.update({"HOME": str(home), "RAY_TMPDIR": str(ray_tmp), "OMP_NUM_THREADS": "1"})
    script = "set -e\n" + "".join(f"echo '+ {c.replace(chr(39), '')[:120]}' >&2\n{c}\n" for c in commands)
    started = time.perf_counter()
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
        yield Walkthrough(repo, env, commands, stop_lines, f"http://127.0.0.1:{mlflow_port}",
                          f"http://127.0.0.1:{dashboard}", proc, time.perf_counter() - started)
    finally:
        from sflam.cluster import tracking_server

        tracking_server.stop(repo / "results")  # by its recorded pid, if the test did not get that far
        end_by_pid(ours("RAY_TMPDIR", str(ray_tmp)))
        left = ours("RAY_TMPDIR", str(ray_tmp))
        shutil.rmtree(scratch, ignore_errors=True)
        assert not left, f"processes left running: {[p.pid for p in left]}"


def test_readme_cluster_section_as_written(walkthrough: Walkthrough) -> None:
    proc = walkthrough.proc
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "SUCCEEDED" in proc.stderr + proc.stdout
    assert (walkthrough.repo / "results" / "mlflow-server.json").exists()
    assert (Path(walkthrough.env["HOME"]) / ".ray" / "auth_token").exists()

    # the runs, through the server the walk-through's UI address points at
    client = MlflowClient(walkthrough.tracking_uri)
    experiment = client.get_experiment_by_name("smoke")
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2, [r.info.run_name for r in runs]  # `ray job submit` and `sflam submit`
    for run in runs:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "round_latency_s")
        assert [m.step for m in history] == [1, 2, 3, 4]  # configs/smoke.yaml: 4 rounds
        accuracy = client.get_metric_history(run.info.run_id, "accuracy")
        assert len(accuracy) == 2 and all(0.0 <= m.value <= 1.0 for m in accuracy)  # eval every 2 rounds
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"rounds.png", "config.yaml", "summary.json", "rounds.csv"} <= names, names
        png = Path(client.download_artifacts(run.info.run_id, "rounds.png", str(walkthrough.repo)))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the server keeps them in the user's results/, not in Ray's temporary folders
    stored = list((walkthrough.repo / "results" / "mlartifacts").rglob("rounds.png"))
    assert len(stored) == 2
    assert not list(Path(walkthrough.env["RAY_TMPDIR"]).rglob("mlflow.db"))


def test_job_with_only_job_local_results_is_refused(walkthrough: Walkthrough) -> None:
    assert walkthrough.proc.returncode == 0
    # the walk-through's `ray job submit`, without the tracking server: results would stay in Ray's temporary folder
    plain = next(line for line in walkthrough.lines if line.startswith("ray job submit"))
    plain = re.sub(r" --runtime-env-json '[^']*'", "", plain)
    assert "MLFLOW_TRACKING_URI" not in plain
    started = time.perf_counter()
    proc = subprocess.run(["bash", "-c", f"source .venv/bin/activate && export RAY_AUTH_MODE=token && {plain}"],
                          cwd=walkthrough.repo, env=walkthrough.env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "failed with exit code 2" in output, output[-3000:]
    # one line (Ray's failure summary repeats the job's log, so the same line may show twice)
    errors = {line.strip() for line in output.splitlines() if "sflam run: error:" in line}
    assert len(errors) == 1, output[-3000:]
    (error,) = errors
    assert "only in the job's temporary working directory" in error
    assert "tracking.uri" in error and "output_dir" in error and "_ray_pkg_" in error
    assert "round 1" not in output and "Traceback" not in output  # refused before any work
    assert elapsed < 120, elapsed


def test_sflam_submit_finds_the_token_as_ray_start_does(walkthrough: Walkthrough) -> None:
    """Without RAY_AUTH_MODE exported, `sflam submit` still authenticates with the token in ~/.ray/auth_token."""
    assert walkthrough.proc.returncode == 0
    env = {k: v for k, v in walkthrough.env.items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run(["bash", "-c", f"source .venv/bin/activate && sflam submit --address {walkthrough.dashboard}"
                          " -- validate configs/smoke.yaml"], cwd=walkthrough.repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "SUCCEEDED" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "configs/smoke.yaml: valid" in proc.stdout
    # the MLflow server the walk-through started is reused, not a second one
    assert f"using the MLflow tracking server {walkthrough.tracking_uri}" in proc.stderr


def test_server_stops_by_its_pid(walkthrough: Walkthrough) -> None:
    assert walkthrough.proc.returncode == 0 and walkthrough.stop_lines
    state = walkthrough.repo / "results" / "mlflow-server.json"
    pid = json.loads(state.read_text())["pid"]
    assert psutil.pid_exists(pid)
    for line in walkthrough.stop_lines:  # `sflam server stop`, as the walk-through says
        proc = subprocess.run(["bash", "-c", f"source .venv/bin/activate && {line}"], cwd=walkthrough.repo,
                              env=walkthrough.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and f"pid {pid}" in proc.stderr, proc.stderr
    assert not state.exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with socket.socket() as sock:  # its port is free again
        assert sock.connect_ex(("127.0.0.1", int(walkthrough.tracking_uri.rsplit(":", 1)[1]))) != 0
