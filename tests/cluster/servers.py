"""Servers a test starts for itself on 127.0.0.1 and stops by their own process id, whatever happens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sflam.cluster import database, tracking_server

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sflam(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The console command `sflam ARGS` in a fresh process, as a user types it."""
    return subprocess.run([sys.executable, "-m", "sflam", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_group(pid: int) -> None:
    """The last resort when a stop command failed: the server's whole process group, by its id."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def postgres(results: Path) -> Iterator[database.Database]:
    """`sflam db start` for `results` on a free port; stopped through its process id on the way out."""
    server, _ = database.start(results, port=free_port())
    try:
        yield server
    finally:
        if database.stop(results) is None or alive(server.pid):
            kill_group(server.pid)


@contextmanager
def mlflow(results: Path, backend: str | None = None, auth: bool = False) -> Iterator[tracking_server.TrackingServer]:
    """`sflam server start` for `results` on a free port; stopped through its process id on the way out."""
    server, _ = tracking_server.start(results, port=free_port(), backend=backend, auth=auth)
    try:
        yield server
    finally:
        if tracking_server.stop(results) is None or alive(server.pid):
            kill_group(server.pid)
