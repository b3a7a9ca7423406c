"""Orphan guard of a local Ray cluster: when its driver dies (even by SIGKILL), end the cluster's processes.

Started by the driver in its own session (`python -m sflam.actors.watchdog DRIVER_PID SESSION_DIR`), it
notes the driver's Ray descendants while the driver lives (GCS, raylet, dashboard and runtime-env agents,
workers), and once the driver is gone sends them SIGTERM, then SIGKILL to whatever is left after a grace
period: Ray's agents outlive a killed driver and ignore SIGTERM otherwise. Processes are matched by id
and start time, so a reused process id is never hit.
"""

from __future__ import annotations

import os
import sys
import time

import psutil

POLL_S = 0.5
GRACE_S = 5.0


def _is_ray(process: psutil.Process, session_dir: str) -> bool:
    try:
        text = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return (bool(session_dir) and session_dir in text) or "ray" in text


def guard(driver_pid: int, session_dir: str) -> None:
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    known: dict[int, float] = {}  # pid -> start time
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        try:
            for child in driver.children(recursive=True):
                if child.pid not in known and child.pid != os.getpid() and _is_ray(child, session_dir):
                    known[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    left = []
    for pid, started in known.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:
                process.terminate()
                left.append(process)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    guard(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
