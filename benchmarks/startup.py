"""Start-up and evaluation of the default experiment on the Ray runtime (issue 11).

1. Time to the first round: `sflam run -c configs/default.yaml train.rounds=1` as a user starts it, from the
   command's start to the start of round 1 (the moment round 1's line appears, less that round's wall time),
   with a cold cost cache (a fresh SFLAM_COST_CACHE) and then warm (the same folder again).
2. Evaluation: the reference runtime's `evaluate` against the Ray runtime's, on the same experiment and
   adapter (results must be equal), each timed twice.

Run: .venv/bin/python benchmarks/startup.py   (writes benchmarks/results/startup.md atomically)
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SFLAM = [sys.executable, "-m", "sflam"]


def first_round_at(cache: Path, out: Path) -> float:
    """Seconds from the command's start to the start of round 1."""
    env = {**os.environ, "SFLAM_COST_CACHE": str(cache)}
    started = time.perf_counter()
    proc = subprocess.Popen([*SFLAM, "run", "-c", "configs/default.yaml", "train.rounds=1", f"output_dir={out}"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    seen = None
    for line in proc.stderr:
        if seen is None and line.startswith("round   1/"):
            seen = time.perf_counter() - started
    if proc.wait() != 0 or seen is None:
        raise SystemExit(f"sflam run failed (exit {proc.returncode})")
    with (out / "default" / "rounds.csv").open() as handle:
        round_wall = float(next(csv.DictReader(handle))["wall_s"])
    return seen - round_wall


def evaluation_times() -> dict[str, object]:
    from sflam.actors.runtime import RayBackend
    from sflam.platform.assembly import Experiment
    from sflam.platform.config import load_config

    config = load_config(ROOT / "configs/default.yaml", ["runtime=ray"])
    exp = Experiment.build(config)
    adapter = exp.device.initial_adapter()
    local = []
    for _ in range(2):
        started = time.perf_counter()
        local_result = exp.evaluate(adapter)
        local.append(time.perf_counter() - started)
    runtime = RayBackend(config, exp)
    try:
        remote = []
        for _ in range(2):
            started = time.perf_counter()
            remote_result = runtime.evaluate(adapter)
            remote.append(time.perf_counter() - started)
        workers = runtime.layout.workers
    finally:
        runtime.shutdown()
    return {"local": local, "ray": remote, "equal": local_result == remote_result, "result": local_result,
            "workers": workers, "samples": len(exp.data.test)}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "out"
        cold = first_round_at(cache, out)
        warm = first_round_at(cache, out)
    ev = evaluation_times()
    local, ray_s = ev["local"], ev["ray"]
    assert isinstance(local, list) and isinstance(ray_s, list)
    text = "\n".join([
        "# Start-up and evaluation of the default experiment (runtime ray)",
        "",
        f"Machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| measure | seconds |",
        "|---|---:|",
        f"| time to the first round, cold cost cache | {cold:.1f} |",
        f"| time to the first round, warm cost cache | {warm:.1f} |",
        f"| evaluation, reference runtime (1st, 2nd) | {local[0]:.1f}, {local[1]:.1f} |",
        f"| evaluation, Ray runtime, {ev['workers']} edge workers (1st, 2nd) | {ray_s[0]:.1f}, {ray_s[1]:.1f} |",
        "",
        f"Ray / reference evaluation time (2nd call): {ray_s[1] / local[1]:.2f}; results equal: {ev['equal']} "
        f"(accuracy, loss {ev['result']} over {ev['samples']} test sentences).",
        "",
        "Command: `.venv/bin/python benchmarks/startup.py`",
        "",
    ])
    target = ROOT / "benchmarks/results/startup.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".startup.md.", dir=target.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.chmod(name, 0o644)
    os.replace(name, target)
    print(text)


if __name__ == "__main__":
    main()
