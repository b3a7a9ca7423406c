"""`sflam server`: an MLflow tracking server on 127.0.0.1 over the local store, for jobs and the UI.

The server keeps runs in `<results>/mlflow.db` (the store local runs use) and serves artifacts itself
(`--serve-artifacts`, stored under `<results>/mlartifacts`), so a driver or actor on any node that
reaches it can upload plots and adapters without a shared filesystem. Its process id, address and
store are kept in `<results>/mlflow-server.json`; `stop` ends it through that process id.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from sflam.platform.errors import SflamError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
STATE_FILE = "mlflow-server.json"
LOG_FILE = "mlflow-server.log"


@dataclass(frozen=True)
class TrackingServer:
    """A running server: its process id, where it listens and what it stores."""

    pid: int
    host: str
    port: int
    backend_store_uri: str
    artifacts_destination: str

    @property
    def uri(self) -> str:
        """The tracking URI for MLFLOW_TRACKING_URI / tracking.uri; the UI is at the same address."""
        return f"http://{self.host}:{self.port}"


def _state(results: Path) -> Path:
    return results / STATE_FILE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (our own child that already exited) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def healthy(uri: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout_s) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def running(results: Path) -> TrackingServer | None:
    """The server started for this results folder, if its process is alive; a stale state file is removed."""
    path = _state(results)
    if not path.exists():
        return None
    try:
        server = TrackingServer(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        path.unlink(missing_ok=True)
        return None
    if not _alive(server.pid):
        path.unlink(missing_ok=True)
        return None
    return server


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _write_state(results: Path, server: TrackingServer) -> None:
    path = _state(results)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(server), indent=2) + "\n")
    tmp.replace(path)


def start(results: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          timeout_s: float = 120.0) -> tuple[TrackingServer, bool]:
    """Start a server over `results` (or find the one already running); returns it and whether it is new."""
    results = results.resolve()
    found = running(results)
    if found is not None:
        return found, False
    if not _port_free(host, port):
        raise SflamError(f"port {port} on {host} is taken by another program; pass --port to `sflam server start`")
    results.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{results / 'mlflow.db'}"
    artifacts = results / "mlartifacts"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--serve-artifacts",
               "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port), "--workers", "1"]
    with open(results / LOG_FILE, "ab") as log:
        # its own session: it outlives this command, and `stop` ends its workers with it as one group
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=results)
    server = TrackingServer(proc.pid, host, port, store, str(artifacts))
    deadline = time.time() + timeout_s
    while not healthy(server.uri):
        if proc.poll() is not None or time.time() > deadline:
            _end(proc.pid)
            tail = (results / LOG_FILE).read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise SflamError(f"the MLflow server on {host}:{port} did not start ({tail[0][:200]}); "
                             f"see {results / LOG_FILE}")
        time.sleep(0.5)
    _write_state(results, server)
    return server, True


def _end(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM the server's process group (the server and its workers), SIGKILL what is left after a while."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)  # our own child when started by this process
            except ChildProcessError:
                reaped = 0
            if reaped == pid or not _alive(pid):
                return
            time.sleep(0.2)


def stop(results: Path) -> TrackingServer | None:
    """Stop the server started for `results` through its process id; None when none was running."""
    results = results.resolve()
    server = running(results)
    if server is None:
        return None
    _end(server.pid)
    _state(results).unlink(missing_ok=True)
    return server
