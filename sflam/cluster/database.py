"""`sflam db`: a PostgreSQL server of our own on 127.0.0.1, for Optuna studies and MLflow (docs/how-to/stores.md).

The server binaries come from the `pgserver` wheel (PostgreSQL 16 for Linux and macOS inside a pip
package), so `pip install` is the whole set-up, on a laptop and in CI alike. Its files live in
`<results>/postgres/`: the cluster (`data/`, created by initdb on first start), a generated password
in libpq's password file `pgpass` (mode 0600), the log, and `server.json` with the server's process
id, address and port; `stop` ends the server through that process id. Authentication is SCRAM only:
`password_encryption = scram-sha-256`, and `pg_hba.conf` accepts TCP connections with scram-sha-256
and nothing else (no Unix socket, no trust, no md5).

The server holds two databases, `optuna` (studies) and `mlflow` (MLflow's backend store): each
library keeps its own alembic version table, so they cannot share one. The URLs it gives are
SQLAlchemy URLs for psycopg 3 that name the password file instead of holding the password
(`postgresql+psycopg://sflam@127.0.0.1:5432/optuna?passfile=...`), so no password appears in a
command line, a config, an MLflow parameter or a log.

PostgreSQL refuses to run as root. Run as root (containers, CI), the server runs in a user namespace
(`unshare --user`) that maps root to an unprivileged user id: nothing is created in /etc/passwd and
no permission outside the data folder changes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from sflam.platform.errors import SflamError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5432
USER = "sflam"
DATABASES = ("optuna", "mlflow")
FOLDER = "postgres"
STATE_FILE = "server.json"
PASSWORD_FILE = "pgpass"
LOG_FILE = "postgres.log"
# enough for study.parallel of about 60 (three connections a trial, see sflam.search.storage)
MAX_CONNECTIONS = 200
# an unprivileged user id every Linux has ("nobody"): what root becomes inside the server's namespace
UNPRIVILEGED = "65534"


@dataclass(frozen=True)
class Database:
    """A running server: its process id, where it listens, and where its password file is."""

    pid: int
    host: str
    port: int
    folder: str
    version: str

    @property
    def password_file(self) -> Path:
        return Path(self.folder) / PASSWORD_FILE

    @property
    def address(self) -> str:
        """The host clients connect to: the listening address, or this machine's own for a wildcard."""
        if self.host in ("0.0.0.0", "::", "*"):
            return socket.gethostbyname(socket.gethostname())
        return self.host

    def url(self, database: str = "optuna") -> str:
        """The SQLAlchemy URL of one of its databases (psycopg 3; the password stays in the password file)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return (f"postgresql+psycopg://{USER}@{host}:{self.port}/{database}"
                f"?passfile={quote(str(self.password_file), safe='/')}")


def is_postgres(url: str) -> bool:
    return url.split("://", 1)[0].split("+", 1)[0].lower() in ("postgresql", "postgres") if "://" in url else False


def with_psycopg(url: str) -> str:
    """A PostgreSQL URL on psycopg 3, the driver the project installs (SQLAlchemy's default is psycopg2)."""
    head, sep, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if sep and head.lower() in ("postgresql", "postgres") else url


def _folder(results: Path) -> Path:
    return results.resolve() / FOLDER


def binaries() -> Path:
    """The folder of initdb and postgres: the pgserver wheel's."""
    import importlib.util

    # found, not imported: importing pgserver starts its own server management (and warns about XDG folders)
    spec = importlib.util.find_spec("pgserver")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(f) / "pginstall" / "bin" for f in folders if (Path(f) / "pginstall" / "bin" / "postgres").is_file()]
    if not found:
        raise SflamError("`sflam db` needs the PostgreSQL binaries of the pgserver package: "
                         "pip install pgserver (it is in the project's dependencies)")
    return found[0]


def _as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL will not run as root: there, run it as an unprivileged user of its own user namespace."""
    if os.geteuid() != 0:
        return command
    unshare = shutil.which("unshare")
    if unshare is None:
        raise SflamError("PostgreSQL will not run as root, and `unshare` (util-linux) is missing to run it as an "
                         "unprivileged user; run `sflam db start` as a normal user")
    return [unshare, "--user", f"--map-user={UNPRIVILEGED}", f"--map-group={UNPRIVILEGED}", *command]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int) -> None:
    """One line before any work for an address no server could listen on."""
    if not 1 <= port <= 65535:
        raise SflamError(f"--port={port}: allowed is a port number in 1..65535")
    if host in ("0.0.0.0", "::", "localhost"):
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise SflamError(f"--host={host!r}: allowed is an IP address of this machine (127.0.0.1 by default, 0.0.0.0 "
                         "for every interface)") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child that already exited) counts as gone
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _postmaster_pid(data: Path) -> int | None:
    """The process id PostgreSQL itself wrote into its data folder while it runs."""
    try:
        return int((data / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def running(results: Path) -> Database | None:
    """The server started for this results folder, if it runs; a stale state file is removed."""
    folder = _folder(results)
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        server = Database(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        path.unlink(missing_ok=True)
        return None
    # the recorded process must be alive and be the postmaster of this data folder (process ids are reused)
    if not _alive(server.pid) or _postmaster_pid(folder / "data") != server.pid:
        path.unlink(missing_ok=True)
        return None
    return server


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        # as PostgreSQL binds: connections of an earlier server still in TIME_WAIT do not hold the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def read_password(password_file: Path) -> str:
    """The password a pgpass file holds for our user (its lines are host:port:database:user:password)."""
    for line in password_file.read_text().splitlines():
        fields = line.split(":")
        if len(fields) == 5 and fields[3] == USER:
            return fields[4]
    raise SflamError(f"{password_file} holds no password for {USER}")


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), never readable by others even for an instant."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    tmp.replace(path)


HBA = """# written by `sflam db`: TCP only, SCRAM only (no trust, no md5, no Unix socket)
# TYPE  DATABASE  USER  ADDRESS       METHOD
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
"""
HBA_ANY = "host    all       all   0.0.0.0/0     scram-sha-256\nhost    all       all   ::/0          scram-sha-256\n"
CONF = f"""
# ---- written by `sflam db` (listen address and port are given on the command line)
password_encryption = 'scram-sha-256'
unix_socket_directories = ''
max_connections = {MAX_CONNECTIONS}
shared_buffers = 32MB
log_destination = 'stderr'
log_min_messages = warning
log_connections = off
"""


def _initdb(folder: Path) -> None:
    """A new cluster: the superuser `sflam` with a generated password (SCRAM), our pg_hba and settings."""
    data = folder / "data"
    password = secrets.token_urlsafe(24)
    _write_private(folder / PASSWORD_FILE, f"*:*:*:{USER}:{password}\n")
    pwfile = folder / "initdb-password"
    _write_private(pwfile, password + "\n")
    command = [str(binaries() / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(pwfile),
               "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-instructions"]
    try:
        done = subprocess.run(_as_server_user(command), capture_output=True, text=True, timeout=300,
                              env={**os.environ, "LC_ALL": "C"})
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1][:300]
        raise SflamError(f"initdb could not create the PostgreSQL cluster in {data}: {last}")
    (data / "pg_hba.conf").write_text(HBA)
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(CONF)


def _connect(server: Database, database: str, timeout_s: float = 5.0):  # -> psycopg.Connection
    import psycopg

    return psycopg.connect(host=server.address, port=server.port, user=USER, dbname=database,
                           password=read_password(server.password_file), connect_timeout=max(1, int(timeout_s)),
                           autocommit=True)


def _create_databases(server: Database) -> None:
    with _connect(server, "postgres") as conn:
        present = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in present:
                conn.execute(f'CREATE DATABASE "{name}"')


def start(results: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          timeout_s: float = 60.0) -> tuple[Database, bool]:
    """Start the server of `results` (or find the one running); returns it and whether it is new."""
    check_address(host, port)
    found = running(results)
    if found is not None:
        return found, False
    folder = _folder(results)
    bin_dir = binaries()
    if not _port_free(host, port):
        raise SflamError(f"port {port} on {host} is taken by another program; pass --port to `sflam db start`")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    data = folder / "data"
    if not (data / "PG_VERSION").is_file():
        _initdb(folder)
    if not (folder / PASSWORD_FILE).is_file():
        raise SflamError(f"{folder / PASSWORD_FILE} is missing: the password of the cluster in {data} is lost; "
                         f"remove {folder} to start over with an empty server")
    hba = HBA + ("" if is_loopback(host) else HBA_ANY)
    if (data / "pg_hba.conf").read_text() != hba:
        (data / "pg_hba.conf").write_text(hba)
    command = [str(bin_dir / "postgres"), "-D", str(data), "-c", f"listen_addresses={host}", "-c", f"port={port}"]
    with open(folder / LOG_FILE, "ab") as log:
        # its own session: it outlives this command; `stop` ends it through its process id
        proc = subprocess.Popen(_as_server_user(command), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
                                env={**os.environ, "LC_ALL": "C"})
    version = (data / "PG_VERSION").read_text().strip()
    server = Database(proc.pid, host, port, str(folder), version)
    deadline = time.time() + timeout_s
    while True:
        try:
            with _connect(server, "postgres", timeout_s=2):
                break
        except Exception as exc:
            if proc.poll() is not None or time.time() > deadline:
                _end(proc.pid)
                lines = (folder / LOG_FILE).read_text(errors="replace").strip().splitlines()
                tail = next((line for line in reversed(lines) if "FATAL" in line or "ERROR" in line),
                            lines[-1] if lines else str(exc))
                raise SflamError(f"PostgreSQL on {host}:{port} did not start ({tail.strip()[:200]}); "
                                 f"see {folder / LOG_FILE}") from None
            time.sleep(0.2)
    try:
        _create_databases(server)
    except Exception as exc:
        _end(proc.pid)
        raise SflamError(f"PostgreSQL on {host}:{port} started but its databases could not be created: "
                         f"{str(exc).strip().splitlines()[0][:200]}") from None
    _write_private(folder / STATE_FILE, json.dumps(asdict(server), indent=2) + "\n")
    return server, True


def _end(pid: int, timeout_s: float = 30.0) -> None:
    """Fast shutdown (SIGINT: PostgreSQL rolls back open transactions and exits), SIGKILL to its group after."""
    for sig, group in ((signal.SIGINT, False), (signal.SIGKILL, True)):
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
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
            time.sleep(0.1)


def stop(results: Path) -> Database | None:
    """Stop the server of `results` through its process id; None when none was running."""
    server = running(results)
    if server is None:
        return None
    _end(server.pid)
    (Path(server.folder) / STATE_FILE).unlink(missing_ok=True)
    return server


def password_of(url: str) -> str | None:
    """The password a URL's `passfile` names for our user, None when the URL names none."""
    from sqlalchemy.engine import make_url

    passfile = make_url(url).query.get("passfile")
    if not passfile:
        return None
    path = Path(passfile if isinstance(passfile, str) else passfile[0])
    if not path.is_file():
        return None
    return read_password(path)
