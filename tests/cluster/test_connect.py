"""Ray starts never attach to a cluster nobody asked for, never hang, and bind to loopback (issue 13).

Each case runs in its own process with a private Ray temp folder (RAY_TMPDIR) holding a stale
`ray_current_cluster` file that names a dead head, as a head killed without `ray stop` leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dead_address() -> str:
    """127.0.0.1 and a port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def stale_ray_tmp() -> Iterator[tuple[dict[str, str], str]]:
    """An environment whose Ray temp folder records a dead cluster; a short path (Ray's sockets live there)."""
    folder = Path(tempfile.mkdtemp(prefix="sfr", dir="/tmp"))
    stale = dead_address()
    (folder / "ray").mkdir()
    (folder / "ray" / "ray_current_cluster").write_text(stale)
    env = {**os.environ, "RAY_TMPDIR": str(folder), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    yield env, stale
    shutil.rmtree(folder, ignore_errors=True)


# The runtime's connect, then the study's parallel start (no trials: only its Ray start and shutdown),
# both with the stale file in place; every listening socket of this process and its children is reported.
FRESH_LOCAL = """
import json, sys
import psutil, ray
from sflam.actors.runtime import connect
from sflam.platform.config import load_config
from sflam.search.study import study_cluster

config = load_config(None, ["runtime=ray", "ray.local_cpus=1"])
owns, description = connect(config, 1)
gcs = ray.get_runtime_context().gcs_address
node_ip = ray.util.get_node_ip_address()
mine = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
listening = sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN and c.pid in mine})
ray.shutdown()
study_config = load_config(None, ["study.parallel=2"])
with study_cluster(study_config) as nodes:  # the study's Ray start and shutdown, no trial
    assert nodes == 1
print(json.dumps({"owns": owns, "description": description, "gcs": gcs, "node_ip": node_ip,
                  "listening": listening, "study_left_ray_running": ray.is_initialized()}))
"""


@pytest.mark.integration  # two Ray starts
def test_no_address_means_a_fresh_loopback_cluster_despite_a_stale_cluster_file(stale_ray_tmp) -> None:
    env, stale = stale_ray_tmp
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", FRESH_LOCAL], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["owns"] and report["description"] == "local cluster, 1 CPUs"
    assert report["gcs"] != stale and report["gcs"].startswith("127.0.0.1:")
    assert report["node_ip"] == "127.0.0.1"
    # GCS, raylet (two servers), the driver's core worker, dashboard agent, runtime-env agent at least
    assert len(report["listening"]) >= 5, report["listening"]
    outward = [a for a in report["listening"] if not a.removeprefix("::ffff:").startswith("127.0.0.1:")]
    assert outward == [], f"Ray services listening beyond loopback: {outward}"
    assert not report["study_left_ray_running"]
    assert elapsed < 120


@pytest.mark.parametrize("command", [
    ["run", "-c", "configs/smoke.yaml", "runtime=ray", "train.rounds=1"],
    ["study", "-c", "configs/study-smoke.yaml", "study.parallel=2", "study.trials=2"],
])
def test_unreachable_address_is_one_line_within_seconds(stale_ray_tmp, tmp_path: Path, command: list[str]) -> None:
    env, _ = stale_ray_tmp
    dead = dead_address()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sflam", *command, f"output_dir={tmp_path}", f"ray.address={dead}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and dead in lines[0] and "no Ray cluster answers" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert elapsed < 60, elapsed  # the process start and model build included; the probe itself is 3 s at most


def test_address_from_the_environment_is_probed_too(stale_ray_tmp) -> None:
    env, _ = stale_ray_tmp
    dead = dead_address()
    script = ("from sflam.cluster.connect import start_ray\n"
              "from sflam.platform.errors import SflamError\n"
              "try:\n    start_ray(None)\nexcept SflamError as exc:\n    print(exc)\n")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**env, "RAY_ADDRESS": dead},
                          capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - started < 30
    assert proc.returncode == 0 and proc.stdout.strip().startswith(f"no Ray cluster answers at {dead}")
