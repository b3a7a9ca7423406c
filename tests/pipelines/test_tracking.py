"""MLflow tracking against a real server and the local store; an outage never stops training."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sflam.pipelines.train import train
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with an sqlite backend, stopped by its own process id."""

    START_S = 120.0  # the server must answer within this, or the test fails saying so

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        mlflow = Path(sys.executable).parent / "mlflow"
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / "server.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
                 str(root / "art")], stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.time() + self.START_S
        while not self._port_open():
            self._give_up_after(deadline, "its port never opened")
            time.sleep(0.5)
        client = MlflowClient(self.uri)
        while True:  # the port opens before the app answers
            try:
                client.search_experiments()
                return
            except Exception as exc:  # any failure to answer is waited out, then reported
                self._give_up_after(deadline, f"it never answered a search ({type(exc).__name__}: {exc})")
            time.sleep(0.5)

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def _give_up_after(self, deadline: float, why: str) -> None:
        """Fail the test, with the server's own last words, once it has exited or the deadline has passed."""
        code = self.proc.poll()
        if code is None and time.time() < deadline:
            return
        self.stop()
        state = f"it exited with code {code}" if code is not None else f"after {self.START_S:.0f} s {why}"
        tail = self.log.read_text(errors="replace")[-2000:]
        pytest.fail(f"the mlflow server on {self.uri} is not usable: {state}; its stderr ends:\n{tail}",
                    pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def server(tmp_path: Path):
    srv = MlflowServer(tmp_path / "mlflow")
    yield srv
    srv.stop()


def test_a_run_is_recorded_on_a_real_server(server: MlflowServer, tmp_path: Path) -> None:
    config = tiny_config(f"tracking.uri={server.uri}", f"output_dir={tmp_path}", "train.rounds=3",
                         "tracking.flush_every=2", "train.eval_every=1")
    result = train(config)
    client = MlflowClient(server.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["split.cut_layer"] == str(config.split.cut_layer)
    assert run.data.params["model.name"] == "tiny-llama"
    history = client.get_metric_history(run.info.run_id, "round_latency_s")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [r.round_latency_s for r in result.rounds])
    accuracy = client.get_metric_history(run.info.run_id, "accuracy")
    assert sorted(m.step for m in accuracy) == [1, 2, 3]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "rounds.csv", "allocation.csv", "rounds.png",
            "device_adapter.safetensors", "server_state.safetensors"} <= names
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "dl")))
    assert '"accuracy"' in local.read_text()


def test_an_outage_mid_run_warns_once_and_training_goes_on(server: MlflowServer, tmp_path: Path, capsys) -> None:
    config = tiny_config(f"tracking.uri={server.uri}", f"output_dir={tmp_path}", "train.rounds=4",
                         "tracking.flush_every=1")

    def stop_after_round_two(metrics) -> None:
        if metrics.round == 2:
            server.stop()

    result = train(config, progress=stop_after_round_two)
    assert len(result.rounds) == 4 and result.accuracy > 0
    err = capsys.readouterr().err
    assert err.count("MLflow tracking at") == 1  # warned once
    spilled = tmp_path / config.name / "unlogged-metrics.json"
    assert spilled.is_file() and '"step": 4' in spilled.read_text()
    assert (tmp_path / config.name / "summary.json").is_file()


def test_default_store_is_local_sqlite_under_the_results(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny_config(f"output_dir={tmp_path}", "train.rounds=2", "name=local-store")
    result = train(config)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["name"] == "local-store"
    assert len(client.get_metric_history(run.info.run_id, "energy_j")) == 2
    assert (tmp_path / "mlartifacts").is_dir()


def test_experiments_open_in_the_model_training_view_and_runs_are_named_by_member_and_seed(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = client.create_experiment("made-before")  # as MLflow makes it: no kind, the UI opens its GenAI view
    assert "mlflow.experimentKind" not in client.get_experiment(before).tags
    for seed in (4, 5):
        config = tiny_config(f"output_dir={tmp_path}", "train.rounds=1", "name=kind", f"seed={seed}",
                             "tracking.experiment=made-before",
                             "study.storage=postgresql://sflam:s3cret@127.0.0.1:5432/optuna")
        result = train(config)
        run = client.get_run(result.mlflow_run_id)
        assert run.info.run_name == f"kind (seed {seed})" and run.data.tags["sflam.seed"] == str(seed)
        assert run.data.params["study.storage"] == "postgresql://sflam:***@127.0.0.1:5432/optuna"  # never the password
    assert client.get_experiment(before).tags["mlflow.experimentKind"] == "custom_model_development"
    fresh = train(tiny_config(f"output_dir={tmp_path}", "train.rounds=1", "name=new-experiment"))
    experiment = client.get_experiment(client.get_run(fresh.mlflow_run_id).info.experiment_id)
    assert experiment.name == "new-experiment"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
