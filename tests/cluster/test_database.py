"""`sflam db`: the project's own PostgreSQL on 127.0.0.1, SCRAM only, a 0600 password, stopped by its process id."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import optuna
import psycopg
import pytest

from sflam.cluster import database
from sflam.platform.errors import SflamError
from sflam.search.storage import check_connections, connections_needed, open_storage
from tests.cluster.servers import alive, free_port, kill_group, sflam

pytestmark = pytest.mark.integration


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def connect(server: database.Database, **kwargs):
    return psycopg.connect(host="127.0.0.1", port=server.port, dbname="optuna", user="sflam", connect_timeout=5,
                           autocommit=True, **kwargs)


def test_db_start_status_stop_and_what_it_lets_in(tmp_path: Path) -> None:
    port = free_port()
    started = sflam("db", "start", "--dir", str(tmp_path), "--port", str(port))
    server = database.running(tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        assert server is not None and alive(server.pid)
        folder = tmp_path / "postgres"
        # one line on stdout: the SQLAlchemy URL on psycopg 3, naming the password file, never the password
        password = database.read_password(folder / "pgpass")
        assert started.stdout == (f"postgresql+psycopg://sflam@127.0.0.1:{port}/optuna?passfile={folder}/pgpass\n")
        assert password not in started.stdout + started.stderr and len(password) >= 24
        assert mode(folder / "pgpass") == 0o600 and mode(folder / "data") == 0o700 and mode(folder) == 0o700
        assert server.pid == int((folder / "data" / "postmaster.pid").read_text().splitlines()[0])

        with connect(server, password=password) as conn:
            settings = {name: conn.execute(f"SHOW {name}").fetchone()[0]
                        for name in ("password_encryption", "listen_addresses", "unix_socket_directories", "port")}
            assert settings == {"password_encryption": "scram-sha-256", "listen_addresses": "127.0.0.1",
                                "unix_socket_directories": "", "port": str(port)}
            # the rules the server itself loaded: TCP from loopback, SCRAM, nothing else
            rules = conn.execute("SELECT type, address, auth_method FROM pg_hba_file_rules").fetchall()
            assert sorted(rules) == [("host", "127.0.0.1", "scram-sha-256"), ("host", "::1", "scram-sha-256")]
            stored = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'sflam'").fetchone()[0]
            assert stored.startswith("SCRAM-SHA-256$")
            names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            assert {"optuna", "mlflow"} <= names
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            connect(server, password=password + "x")
        with pytest.raises(psycopg.OperationalError, match="no password supplied"):
            connect(server, passfile=os.devnull)

        # Optuna through the printed URL (the password file does the rest)
        url = started.stdout.strip()
        study = optuna.create_study(study_name="kept", storage=open_storage(url))
        study.add_trial(optuna.trial.create_trial(value=1.5))

        status = sflam("db", "status", "--dir", str(tmp_path))
        assert status.returncode == 0 and status.stdout == started.stdout
        again = sflam("db", "start", "--dir", str(tmp_path), "--port", str(port))
        assert again.returncode == 0 and "already running" in again.stderr and database.running(tmp_path) == server

        stopped = sflam("db", "stop", "--dir", str(tmp_path))
        assert stopped.returncode == 0 and f"(pid {server.pid})" in stopped.stderr
        assert not alive(server.pid) and not (folder / "server.json").exists()
        gone = sflam("db", "status", "--dir", str(tmp_path))
        assert gone.returncode == 1 and gone.stdout == ""

        # a second start keeps the cluster, its password and its studies
        restarted, new = database.start(tmp_path, port=port)
        assert new and restarted.pid != server.pid
        assert database.read_password(folder / "pgpass") == password
        kept = optuna.load_study(study_name="kept", storage=open_storage(url))
        assert [t.value for t in kept.trials] == [1.5]
    finally:
        last = database.running(tmp_path)
        database.stop(tmp_path)
        for pid in {server.pid if server else 0, last.pid if last else 0} - {0}:
            if alive(pid):
                kill_group(pid)


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "0"], "sflam db: error: --port=0: allowed is a port number in 1..65535\n"),
    (["--host", "nowhere"], "sflam db: error: --host='nowhere': allowed is an IP address of this machine "
                            "(127.0.0.1 by default, 0.0.0.0 for every interface)\n"),
])
def test_bad_input_is_one_line_and_starts_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    try:
        done = sflam("db", "start", "--dir", str(tmp_path), *args)
    finally:
        database.stop(tmp_path)  # had it started after all: through its process id
    assert done.returncode == 2 and done.stderr == message and done.stdout == ""
    assert not (tmp_path / "postgres").exists()


def test_a_taken_port_is_one_line_and_leaves_nothing_running(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        try:
            done = sflam("db", "start", "--dir", str(tmp_path), "--port", str(port))
        finally:
            database.stop(tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"sflam db: error: port {port} on 127.0.0.1 is taken by another program; pass --port to "
                           "`sflam db start`\n")
    assert database.running(tmp_path) is None and not (tmp_path / "postgres" / "data").exists()


def test_a_study_needing_more_connections_than_the_server_has_stops_before_it_starts(tmp_path: Path) -> None:
    server, _ = database.start(tmp_path, port=free_port())
    try:
        storage = open_storage(server.url("optuna"))
        check_connections(storage, parallel=8)  # 8 in flight need 28 of about 197 free
        assert connections_needed(8) == 3 * 8 + 4  # the driver: 8 + 2 and 2 spare; each trial: 2
        with pytest.raises(SflamError) as info:
            check_connections(storage, parallel=70)
        message = str(info.value)
        assert message.startswith(f"study.parallel=70 needs up to {connections_needed(70)} PostgreSQL connections, "
                                  "the server has ") and "max_connections=200" in message and "\n" not in message
        storage.engine.dispose()
    finally:
        database.stop(tmp_path)
        if alive(server.pid):
            kill_group(server.pid)


def test_a_wrong_password_in_the_url_is_one_line(tmp_path: Path) -> None:
    server, _ = database.start(tmp_path, port=free_port())
    try:
        url = f"postgresql://sflam:wrong-secret@127.0.0.1:{server.port}/optuna"
        with pytest.raises(SflamError) as info:
            open_storage(url)
        message = str(info.value)
        assert message.startswith(f"study.storage=postgresql+psycopg://sflam:***@127.0.0.1:{server.port}/optuna: "
                                  "cannot open it (")
        assert "password authentication failed" in message and "wrong-secret" not in message
        assert "\n" not in message and message.endswith("for the project's own PostgreSQL run `sflam db start`")
    finally:
        database.stop(tmp_path)
        if alive(server.pid):
            kill_group(server.pid)


def test_processes_opening_a_new_study_database_at_once_all_get_it(tmp_path: Path) -> None:
    # each creates Optuna's tables in the empty database: PostgreSQL lets one win, the others retry
    import threading

    server, _ = database.start(tmp_path, port=free_port())
    errors: list[str] = []

    def open_it() -> None:
        try:
            open_storage(server.url("optuna")).engine.dispose()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    try:
        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
    finally:
        database.stop(tmp_path)
        if alive(server.pid):
            kill_group(server.pid)
