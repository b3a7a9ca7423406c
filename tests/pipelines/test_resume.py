"""Checkpoints and exact resume after SIGKILL (both runtimes), no orphaned Ray processes, the MLflow run lifecycle."""

from __future__ import annotations

import contextlib
import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from sflam.pipelines.train import train
from sflam.platform.tracking import FAILURE_TAG
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 5
TINY = ["model.name=tiny-llama", "data.dataset=synthetic", "data.num_devices=20", "data.synthetic_samples=600",
        "train.devices_per_round=4", f"train.rounds={ROUNDS}", "train.local_steps=2", "train.batch_size=8",
        "train.eval_every=2", "train.device_lr=0.005", "train.server_lr=0.005", "quant.weights=nf4",
        "quant.activation_bits=6", "aggregation.strategy=fedadam", "participation.dropout=0.2", "name=resume"]


def sflam(*args: str) -> list[str]:
    return [sys.executable, "-m", "sflam", *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_to_end(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(sflam("run", *TINY, f"output_dir={out}", *extra), cwd=ROOT, env=env(), text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def started_by(pid: int) -> dict[int, psutil.Process]:
    """Every process the run has started and that is still there, whatever its name: its descendants, and the
    members of its session (the run leads one), which a process that left the tree by double-forking stays in."""
    found = {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    for process in psutil.process_iter():
        try:
            if process.pid != pid and os.getsid(process.pid) == pid:
                found.setdefault(process.pid, process)
        except (OSError, psutil.Error):  # gone meanwhile
            continue
    return found


def start_and_kill(out: Path, kill_after: int, *extra: str) -> tuple[list[psutil.Process], str]:
    """Start a run in its own session, SIGKILL it once round `kill_after` is reported; returns every process it
    started (seen at any reported line, up to the kill) and its stderr."""
    proc = subprocess.Popen(sflam("run", *TINY, *extra, f"output_dir={out}"), cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stderr is not None
    lines: list[str] = []
    started: dict[int, psutil.Process] = {}
    try:
        for line in proc.stderr:
            lines.append(line)
            for found in started_by(proc.pid).values():  # psutil.Process: a reused pid is not the same process
                started.setdefault(found.pid, found)
            if line.startswith(f"round {kill_after:>3}/{ROUNDS}"):
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    return list(started.values()), "".join(lines)


def rounds_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(handle)]


def assert_same_run(resumed: Path, clean: Path) -> None:
    for name in ("device_adapter", "server_state"):
        a, b = load_file(resumed / f"{name}.safetensors"), load_file(clean / f"{name}.safetensors")
        assert a.keys() == b.keys() and a
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, name
    assert rounds_csv(resumed / "rounds.csv") == rounds_csv(clean / "rounds.csv")


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    def running(process: psutil.Process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in processes if running(p)]


def described(process: psutil.Process) -> str:
    try:
        return f"{process.pid}: {' '.join(process.cmdline())[:120]}"
    except psutil.Error:
        return f"{process.pid}: gone"


def test_local_run_killed_at_a_random_round_resumes_to_the_uninterrupted_result(tmp_path: Path,
                                                                                rng: random.Random) -> None:
    kill_after = rng.randint(1, ROUNDS - 2)
    run_to_end(tmp_path / "clean")
    _, log = start_and_kill(tmp_path / "killed", kill_after)
    target = tmp_path / "killed" / "resume"
    store = MlflowClient(f"sqlite:///{tmp_path / 'killed' / 'mlflow.db'}")
    (run,) = store.search_runs([store.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "RUNNING"  # its process is gone: `sflam runs --clean` notices
    cleaned = subprocess.run(sflam("runs", "--clean", f"output_dir={tmp_path / 'killed'}"), cwd=ROOT, env=env(),
                             text=True, capture_output=True, timeout=120)
    assert cleaned.returncode == 0 and cleaned.stdout.split() == [run.info.run_id], cleaned.stderr
    failed = store.get_run(run.info.run_id)
    assert failed.info.status == "FAILED" and "ended without closing the run" in failed.data.tags[FAILURE_TAG]
    resumed = subprocess.run(sflam("run", *TINY, f"output_dir={tmp_path / 'killed'}", "--resume"), cwd=ROOT,
                             env=env(), text=True, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = int(resumed.stderr.split("resuming resume after round ")[1].split()[0])
    assert kill_after <= after < ROUNDS  # the checkpoint of the last round completed before the kill
    assert f"round {1:>3}/{ROUNDS}" not in resumed.stderr  # the completed rounds are not run again
    assert_same_run(target, tmp_path / "clean" / "resume")
    # the same MLflow run continues, FINISHED, with exactly one value per round
    finished = store.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and FAILURE_TAG not in finished.data.tags
    assert [m.step for m in store.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, ROUNDS + 1))
    assert len(store.search_runs([run.info.experiment_id])) == 1, log


@pytest.mark.slow
def test_ray_run_killed_leaves_no_orphans_and_resumes_exactly(tmp_path: Path, rng: random.Random) -> None:
    ray_args = ("runtime=ray", "ray.workers=2", "ray.local_cpus=3")
    kill_after = rng.randint(1, ROUNDS - 2)
    started, _ = start_and_kill(tmp_path / "killed", kill_after, *ray_args)
    try:
        assert len(started) >= 4  # GCS, raylet, the agents, the workers, the watchdog
        deadline = time.monotonic() + 30
        while alive(started) and time.monotonic() < deadline:
            time.sleep(1)
        # whatever the run started, Ray's or not, is gone (the watchdog's own filter is not the test's)
        assert not alive(started), [described(p) for p in alive(started)]
    finally:
        for process in alive(started):  # never leave our own cluster behind, even when the test fails
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    run_to_end(tmp_path / "killed", *ray_args, "--resume")
    run_to_end(tmp_path / "clean", *ray_args)
    assert_same_run(tmp_path / "killed" / "resume", tmp_path / "clean" / "resume")


def test_a_failed_run_is_marked_failed_with_its_reason(tmp_path: Path) -> None:
    config = tiny_config(f"output_dir={tmp_path}", "train.rounds=2", "name=broken")
    (tmp_path / "broken" / "checkpoint.pt").mkdir(parents=True)  # the checkpoint cannot be written: a disk fault
    with pytest.raises(IsADirectoryError):
        train(config)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("broken").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags[FAILURE_TAG].startswith("IsADirectoryError")
    assert not [p for p in (tmp_path / "broken").iterdir() if p.name.endswith(".tmp")]


def test_resume_without_a_checkpoint_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(sflam("run", *TINY, f"output_dir={tmp_path}", "--resume"), cwd=ROOT, env=env(), text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("sflam run: error: --resume=")


def test_scale_resumes_member_by_member_in_the_same_runs(tmp_path: Path) -> None:
    from sflam.pipelines.scale import run_scale

    config = tiny_config(f"output_dir={tmp_path}", "train.rounds=2", "data.num_devices=8", "name=grow")
    first = run_scale(config, sizes=(2, 4))
    member = tmp_path / "grow-scale" / "k4"
    (member / "summary.json").unlink()  # as if the run had died before its last outputs
    rounds_seen: list[int] = []
    again = run_scale(config, sizes=(2, 4), resume=True, progress=lambda k, m: rounds_seen.append(m.round))
    assert rounds_seen == []  # both members had checkpointed every round: nothing is trained again
    assert again.parent_run_id == first.parent_run_id
    assert [r["mlflow_run_id"] for r in again.rows] == [r["mlflow_run_id"] for r in first.rows]
    assert [r["accuracy"] for r in again.rows] == [r["accuracy"] for r in first.rows]
    assert (member / "summary.json").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert {client.get_run(r["mlflow_run_id"]).info.status for r in again.rows} == {"FINISHED"}


def test_a_diverged_run_exits_1_with_one_line_and_is_failed_in_mlflow(tmp_path: Path) -> None:
    proc = subprocess.run(sflam("run", *TINY, f"output_dir={tmp_path}", "train.device_lr=1e30",
                                "train.lr_schedule=constant", "participation.dropout=0"), cwd=ROOT, env=env(),
                          text=True, capture_output=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sflam run: error: round ") and "non-finite value(s)" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags[FAILURE_TAG]
