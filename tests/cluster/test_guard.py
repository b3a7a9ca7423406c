"""A Ray job whose results would live only in its temporary working directory is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sflam.cluster.guard import JOB_CONFIG_ENV, RayJob, current_job, refuse_job_local_results
from sflam.cluster.submit import job_tracking_uri
from sflam.platform.config import load_config
from sflam.platform.errors import SflamError


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RayJob:
    """A driver running in Ray's unpacked copy of the working directory, as `ray job submit --working-dir .` does."""
    package = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({
        "runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"},
        "metadata": {"job_submission_id": "raysubmit_test", "job_name": "raysubmit_test"}}))
    found = current_job()
    assert found == RayJob("raysubmit_test", package.resolve())
    return found


def test_default_results_in_a_job_are_refused_in_one_line(job: RayJob) -> None:
    with pytest.raises(SflamError) as refused:
        refuse_job_local_results(load_config(None, []))
    message = str(refused.value)
    assert "\n" not in message and "raysubmit_test" in message and str(job.working_dir) in message
    assert "MLflow store sqlite:///results/mlflow.db and outputs results" in message
    assert "tracking.uri" in message and "MLFLOW_TRACKING_URI" in message and "output_dir" in message


@pytest.mark.parametrize("overrides, refused", [
    ([], True),
    (["tracking.uri=http://127.0.0.1:5000"], False),  # artifacts go to the server: local outputs are a copy
    (["tracking.uri=sqlite:///results/other.db"], True),  # an explicit store, still job-local
    (["tracking.uri=sqlite:////srv/mlflow/mlflow.db"], False),
    (["output_dir=/srv/results"], False),  # the default store follows output_dir
    (["output_dir=/srv/results", "tracking.uri=./mlruns"], True),
    (["tracking.enabled=false"], True),  # untracked: the outputs are all there is
    (["tracking.enabled=false", "output_dir=/srv/results"], False),
])
def test_which_settings_keep_a_job_s_results(job: RayJob, overrides: list[str], refused: bool) -> None:
    config = load_config(None, overrides)
    if refused:
        with pytest.raises(SflamError, match="only in the job's temporary working directory"):
            refuse_job_local_results(config)
    else:
        refuse_job_local_results(config)


def test_tracking_server_from_the_environment_is_enough(job: RayJob, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    refuse_job_local_results(load_config(None, []))


def test_outside_a_job_or_without_a_working_dir_nothing_is_refused(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert current_job() is None
    refuse_job_local_results(load_config(None, []))
    # a job without a working_dir runs in the head's own folder, not a temporary copy
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "j"}}))
    assert current_job() == RayJob("j", None)
    refuse_job_local_results(load_config(None, []))


def test_submit_picks_the_jobs_tracking_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    command = ["run", "-c", "configs/smoke.yaml"]
    assert job_tracking_uri("http://mlflow:5000", "http://127.0.0.1:8265", tmp_path, command) == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert job_tracking_uri(None, "http://127.0.0.1:8265", tmp_path, command) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # a remote head gets no server of this machine; a command with its own tracking.uri keeps it
    assert job_tracking_uri(None, "http://10.1.2.3:8265", tmp_path, command) is None
    assert job_tracking_uri(None, "http://127.0.0.1:8265", tmp_path, [*command, "tracking.uri=sqlite:////x.db"]) is None
    assert not (tmp_path / "results").exists()  # no server was started for any of these


def test_server_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from sflam.cli import main
    from sflam.cluster import tracking_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["server", "start", "--dir", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sflam server: error: port {port} on 127.0.0.1 is taken by another program; pass --port to "
                   "`sflam server start`"]
    # a state file left by a server that is gone is not a running server
    (tmp_path / tracking_server.STATE_FILE).write_text(
        '{"pid": 999999999, "host": "127.0.0.1", "port": 5000, "backend_store_uri": "sqlite:///x", '
        '"artifacts_destination": "x"}')
    assert main(["server", "status", "--dir", str(tmp_path)]) == 1
    assert not (tmp_path / tracking_server.STATE_FILE).exists()
    assert main(["server", "stop", "--dir", str(tmp_path)]) == 0
    assert "no MLflow server running" in capsys.readouterr().err
