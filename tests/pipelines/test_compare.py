"""`sflam compare` and `sflam scale`: every method on the same scenario, child runs under one parent."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from sflam.pipelines.baselines import METHODS, method_config
from sflam.pipelines.compare import run_compare
from sflam.pipelines.scale import run_scale
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration


def test_method_configs_follow_the_design() -> None:
    base = tiny_config("quant.weights=nf4", "quant.activation_bits=8")
    sfl, sflq, ours = (method_config(base, m) for m in ("sfl", "sfl-q", "sflam"))
    assert (sfl.quant.weights, sfl.quant.activation_bits, sfl.allocation.policy) == ("fp32", 32, "equal")
    assert (sflq.quant.weights, sflq.quant.activation_bits, sflq.allocation.policy) == ("nf4", 8, "equal")
    assert (ours.quant.weights, ours.allocation.policy) == ("nf4", "sflam")
    assert method_config(base, "fl").quant.weights == "fp32"
    v2 = method_config(base, "sfl-v2")  # SFL-V1's settings, the server part trained device after device
    assert (v2.quant.weights, v2.quant.activation_bits, v2.allocation.policy, v2.runtime) == ("fp32", 32, "equal",
                                                                                              "local")
    # same devices, data, channels and seeds
    for method in METHODS:
        cfg = method_config(base, method)
        assert (cfg.seed, cfg.data, cfg.system, cfg.train) == (base.seed, base.data, base.system, base.train)


def test_compare_runs_every_method_as_child_runs(tmp_path: Path) -> None:
    config = tiny_config(f"output_dir={tmp_path}", "train.rounds=6", "train.eval_every=6", "quant.weights=nf4",
                         "quant.activation_bits=8", "quant.gradient_bits=8")
    result = run_compare(config)
    rows = {r["method"]: r for r in result.rows}
    assert list(rows) == list(METHODS)
    for row in rows.values():
        assert row["accuracy"] > 0.7, row  # every method learns the synthetic task
        assert row["energy_j"] > 0 and row["comm_latency_s"] > 0
    # the whole model on the device costs more memory than a quantized cut-2 device part
    assert rows["fl"]["device_memory_bytes"] > rows["sfl"]["device_memory_bytes"] > rows["sflam"]["device_memory_bytes"]
    assert rows["sflam"]["device_memory_bytes"] == rows["sfl-q"]["device_memory_bytes"]
    # 8-bit smashed data send a quarter of fp32's payload: less time on the air
    assert rows["sfl-q"]["comm_latency_s"] < rows["sfl"]["comm_latency_s"]
    assert rows["sflam"]["comm_latency_vs_sfl"] < 1
    # the ratios, recomputed from each member's own records: its rounds (rounds.csv) and its summary.json
    target = tmp_path / f"{config.name}-compare"
    rounds = {m: list(csv.DictReader((target / m / "rounds.csv").open())) for m in METHODS}
    summary = {m: json.loads((target / m / "summary.json").read_text()) for m in METHODS}

    def mean(method: str, key: str) -> float:
        return float(np.mean([float(r[key]) for r in rounds[method]]))

    def samples_per_j(method: str) -> float:
        return sum(int(r["samples"]) for r in rounds[method]) / sum(float(r["energy_j"]) for r in rounds[method])

    for method in ("fl", "sl", "sfl-v2", "sfl-q", "sflam"):
        row = rows[method]
        assert row["comm_latency_vs_sfl"] == pytest.approx(mean(method, "comm_latency_s")
                                                           / mean("sfl", "comm_latency_s"), rel=1e-9), method
        assert row["round_latency_vs_sfl"] == pytest.approx(mean(method, "round_latency_s")
                                                            / mean("sfl", "round_latency_s"), rel=1e-9), method
        assert row["energy_efficiency_vs_sfl"] == pytest.approx(samples_per_j(method) / samples_per_j("sfl"),
                                                                rel=1e-9), method
        assert row["memory_vs_fl"] == pytest.approx(summary[method]["device_memory_bytes"]
                                                    / summary["fl"]["device_memory_bytes"], rel=1e-12), method
        assert row["accuracy_vs_fl_points"] == pytest.approx(
            100 * (summary[method]["accuracy"] - summary["fl"]["accuracy"]), abs=1e-9), method
    # sl: one device after another, so each round lasts at least the sum of its devices' own times (compute,
    # uplink, downlink: allocation.csv); sfl's devices share the round, which is shorter than that sum
    for method, one_at_a_time in (("sl", True), ("sfl", False)):
        per_device = list(csv.DictReader((target / method / "allocation.csv").open()))
        for r in rounds[method]:
            own = sum(float(d["compute_s"]) + float(d["uplink_s"]) + float(d["downlink_s"])
                      for d in per_device if d["round"] == r["round"])
            assert (float(r["round_latency_s"]) >= own * (1 - 1e-12)) is one_at_a_time, (method, r["round"])
    # sfl-v2: each round ends when its last device's adapter is up behind the server's queue (allocation.csv's
    # finish times are the queue's, not the lockstep's); the same fp32 device part as sfl
    per_device = list(csv.DictReader((target / "sfl-v2" / "allocation.csv").open()))
    for r in rounds["sfl-v2"]:
        finish = [float(d["finish_s"]) for d in per_device if d["round"] == r["round"]]
        assert float(r["round_latency_s"]) == pytest.approx(max(finish), rel=1e-12)
    assert rows["sfl-v2"]["device_memory_bytes"] == rows["sfl"]["device_memory_bytes"]
    # the same split and fp32 work per device: sl's computation adds up, sfl's overlaps between barriers
    assert rows["sl"]["compute_latency_s"] > rows["sfl"]["compute_latency_s"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(f"{m} (seed 0)" for m in METHODS)  # method, seed
    assert {"compare.csv", "compare.md", "compare.json", "compare.png"} <= {
        a.path for a in client.list_artifacts(result.parent_run_id)}
    assert result.table_path.with_suffix(".md").read_text().count("| sflam |") == 1


def test_scale_runs_each_size_as_a_child(tmp_path: Path) -> None:
    config = tiny_config(f"output_dir={tmp_path}", "train.rounds=1", "data.num_devices=8")
    result = run_scale(config, sizes=(2, 8, 16))
    assert [r["devices_per_round"] for r in result.rows] == [2, 8, 16]
    energy = [r["energy_j"] for r in result.rows]
    assert energy[0] < energy[1] < energy[2]  # more devices, more device energy in a round
    assert all(r["wall_s_per_round"] > 0 for r in result.rows)
    assert result.plot_path.read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 3


def test_compare_over_seeds_reports_means_and_paired_intervals(tmp_path: Path) -> None:
    from scipy import stats

    config = tiny_config(f"output_dir={tmp_path}", "train.rounds=2", "train.eval_every=1", "quant.weights=nf4",
                         "quant.activation_bits=8")
    result = run_compare(config, methods=("sfl", "sflam"), seeds=3)
    rows = {r["method"]: r for r in result.rows}
    target = tmp_path / f"{config.name}-compare"
    per_seed = {m: [json.loads((target / f"seed{s}" / m / "summary.json").read_text()) for s in (0, 1, 2)]
                for m in ("sfl", "sflam")}
    for method, summaries in per_seed.items():
        values = np.array([s["energy_j"] for s in summaries])
        assert len(set(values.tolist())) == 3  # each seed places, fades and partitions anew
        half = stats.t.ppf(0.975, 2) * values.std(ddof=1) / np.sqrt(3)
        assert rows[method]["seeds"] == 3
        assert rows[method]["energy_j"] == pytest.approx(values.mean(), rel=1e-12)
        assert rows[method]["energy_j_ci95"] == pytest.approx(half, rel=1e-9)
    # ratios are paired: formed within each seed, then averaged
    ratios = [a["comm_latency_s"] / b["comm_latency_s"] for a, b in zip(per_seed["sflam"], per_seed["sfl"],
                                                                        strict=True)]
    assert rows["sflam"]["comm_latency_vs_sfl"] == pytest.approx(np.mean(ratios), rel=1e-12)
    assert (target / "compare_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "±" in result.table_path.with_suffix(".md").read_text()


def test_mean_and_interval_match_the_textbook() -> None:
    from sflam.pipelines.seeds import mean_ci

    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302652729749462 / np.sqrt(3), rel=1e-9)  # t(0.975, 2 dof)


def test_compare_resumes_member_by_member_under_the_same_parent(tmp_path: Path) -> None:
    config = tiny_config(f"output_dir={tmp_path}", "train.rounds=2", "train.eval_every=2")
    first = run_compare(config, methods=("sfl", "sflam"))
    again = run_compare(config, methods=("sfl", "sflam"), resume=True)  # every member finished: only re-recorded
    assert again.parent_run_id == first.parent_run_id
    for a, b in zip(first.rows, again.rows, strict=True):
        assert (a["accuracy"], a["energy_j"], a["round_latency_s"]) == (b["accuracy"], b["energy_j"],
                                                                         b["round_latency_s"])
