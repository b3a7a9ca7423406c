"""The command line end to end: `sflam run` on the smoke config writes the summary JSON and a table."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"accuracy", "loss", "rounds", "devices", "devices_per_round", "round_latency_s", "comm_latency_s",
                "compute_latency_s", "energy_j", "energy_efficiency_samples_per_j", "device_memory_bytes", "wall_s",
                "mlflow_run_id"}


def test_sflam_run_smoke_writes_summary_and_table(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "sflam", "run", "-c", "configs/smoke.yaml", f"output_dir={tmp_path / 'results'}",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["rounds"] == 4 and summary["devices"] == 100 and summary["devices_per_round"] == 10
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["loss"] > 0
    assert summary["uplink_bits_per_round"] > 0 and summary["device_weight_bytes"] > 0
    for key in ("round_latency_s", "comm_latency_s", "compute_latency_s", "energy_j",
                "energy_efficiency_samples_per_j", "device_memory_bytes"):
        assert summary[key] > 0, key
    assert summary["round_latency_s"] >= summary["comm_latency_s"]
    # per-round progress on stderr, the closing table on stdout
    assert proc.stderr.count("round ") >= 4
    assert "test acc" in proc.stdout and "accuracy" in proc.stdout
    saved = tmp_path / "results" / "smoke"
    assert (saved / "config.yaml").is_file() and (saved / "summary.json").is_file()


def test_sflam_tradeoff_writes_the_front(tmp_path: Path) -> None:
    out = tmp_path / "front.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sflam", "tradeoff", "-c", "configs/smoke.yaml", f"output_dir={tmp_path}",
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    points = json.loads(out.read_text())
    assert next(p["lambda"] for p in points) == 0.0 and points[-1]["lambda"] == 1.0
    latency = [p["round_latency_s"] for p in points]
    energy = [p["energy_j"] for p in points]
    # a Pareto front: more weight on latency never gives a slower round or a cheaper one
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(latency))
    assert all(b >= a * (1 - 1e-6) for a, b in itertools.pairwise(energy))
    assert latency[-1] < latency[0] and energy[0] < energy[-1]
    png = tmp_path / "smoke" / "tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "smoke" / "tradeoff.csv").read_text().count("\n") == len(points) + 1
    assert "floors" in proc.stdout


def test_options_and_overrides_come_in_any_order() -> None:
    from sflam.cli import parse

    args = parse(["run", "a.b=1", "--json", "out.json", "c.d=2", "-c", "x.yaml", "e.f=3", "--seeds", "2"])
    assert (args.json, args.config, args.seeds) == ("out.json", "x.yaml", 2)
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"]  # in the order typed: a later one wins
    assert parse(["validate", "configs/smoke.yaml", "x=1"]).overrides == ["x=1"]
    import pytest

    with pytest.raises(SystemExit) as usage:
        parse(["run", "--json", "out.json", "--bogus", "a=1"])
    assert usage.value.code == 2
