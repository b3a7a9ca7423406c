"""`sflam server`: an MLflow tracking server on 127.0.0.1 over the local store, for jobs and the UI.

The server keeps runs in `<results>/mlflow.db` (the store local runs use), or in PostgreSQL with
`--backend-store postgresql://...` (`db`: the `sflam db` server's `mlflow` database), and serves
artifacts itself (`--serve-artifacts`, stored under `<results>/mlartifacts`), so a driver or actor on
any node that reaches it can upload plots and adapters without a shared filesystem. Its process id,
address and store are kept in `<results>/mlflow-server.json`; `stop` ends it through that process id.

A server bound beyond loopback lets in only its users or does not start: `--auth` runs MLflow's own
basic-auth app (`mlflow server --app-name basic-auth`) with an admin whose password is generated into
MLflow's auth config (`<results>/mlflow-auth/basic_auth.ini`, mode 0600, beside the auth app's own
user database); clients send MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

import configparser
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from sflam.cluster.database import is_loopback, with_psycopg
from sflam.platform.errors import SflamError
from sflam.platform.tracking import redact

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
STATE_FILE = "mlflow-server.json"
LOG_FILE = "mlflow-server.log"
AUTH_FOLDER = "mlflow-auth"
AUTH_CONFIG = "basic_auth.ini"
ADMIN = "admin"
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


@dataclass(frozen=True)
class TrackingServer:
    """A running server: its process id, where it listens and what it stores."""

    pid: int
    host: str
    port: int
    backend_store_uri: str
    artifacts_destination: str
    auth: bool = False

    @property
    def uri(self) -> str:
        """The tracking URI for MLFLOW_TRACKING_URI / tracking.uri; the UI is at the same address."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


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


def backend_store(results: Path, store: str | None) -> str:
    """The backend store URI: SQLite under results by default, `db` for the `sflam db` server's `mlflow`
    database, a PostgreSQL URL on psycopg 3, or any other SQLAlchemy URL as given."""
    if store is None:
        return f"sqlite:///{results / 'mlflow.db'}"
    if store == "db":
        from sflam.cluster import database

        server = database.running(results)
        if server is None:
            raise SflamError(f"--backend-store db: no `sflam db` server runs for {results}; start one with "
                             f"`sflam db start --dir {results}`")
        return server.url("mlflow")
    if "://" not in store:
        raise SflamError(f"--backend-store={redact(store)}: allowed is db, postgresql://user@host:port/database "
                         "or another SQLAlchemy URL")
    return with_psycopg(store)


def check_exposure(host: str, auth: bool) -> None:
    """A server reachable from other machines must authenticate its users: one line, before any work."""
    if not auth and not is_loopback(host):
        raise SflamError(f"--host {host} lets in anyone who reaches this machine: add --auth (MLflow's basic-auth "
                         "app, with admin credentials generated into results/mlflow-auth/basic_auth.ini), or keep "
                         "--host 127.0.0.1")


def auth_config_path(results: Path) -> Path:
    return results.resolve() / AUTH_FOLDER / AUTH_CONFIG


def credentials(results: Path) -> dict[str, str]:
    """The admin's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from the auth config of `results`."""
    path = auth_config_path(results)
    parser = configparser.ConfigParser()
    parser.read(path)
    if not parser.has_option("mlflow", "admin_password"):
        return {}
    return {USERNAME_ENV: parser["mlflow"]["admin_username"], PASSWORD_ENV: parser["mlflow"]["admin_password"]}


def _auth_config(results: Path) -> Path:
    """MLflow's basic-auth config with a generated admin password (0600), and the auth app's own database.

    The admin is created from the config the first time the auth app meets an empty user database, so the
    two are made together: a database whose config is gone is discarded with it."""
    folder = results / AUTH_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / AUTH_CONFIG
    if path.is_file() and credentials(results):
        return path
    (folder / "basic_auth.db").unlink(missing_ok=True)
    os.close(os.open(folder / "basic_auth.db", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # its hashes: 0600
    text = (f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{folder / 'basic_auth.db'}\n"
            f"admin_username = {ADMIN}\nadmin_password = {secrets.token_urlsafe(24)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(text)
    tmp.replace(path)
    return path


def start(results: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, backend: str | None = None,
          auth: bool = False, timeout_s: float = 120.0) -> tuple[TrackingServer, bool]:
    """Start a server over `results` (or find the one already running); returns it and whether it is new."""
    check_exposure(host, auth)
    results = results.resolve()
    found = running(results)
    if found is not None:
        if auth and not found.auth:
            raise SflamError(f"the MLflow server of {results} (pid {found.pid}) runs without --auth; stop it with "
                             "`sflam server stop` and start it again with --auth")
        return found, False
    store = backend_store(results, backend)
    if not _port_free(host, port):
        raise SflamError(f"port {port} on {host} is taken by another program; pass --port to `sflam server start`")
    results.mkdir(parents=True, exist_ok=True)
    artifacts = results / "mlartifacts"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--serve-artifacts",
               "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port), "--workers", "1"]
    env = dict(os.environ)
    if auth:
        command += ["--app-name", "basic-auth"]
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(_auth_config(results))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
    with open(results / LOG_FILE, "ab") as log:
        # its own session: it outlives this command, and `stop` ends its workers with it as one group; a server
        # with users keeps what it writes (its user database, runs, artifacts) to its owner
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=results, env=env, umask=0o077 if auth else -1)
    server = TrackingServer(proc.pid, host, port, redact(store), str(artifacts), auth)
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
