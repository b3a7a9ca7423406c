"""Device classes (devices.classes): shares -> counts, seeded draws, the cost model per class, the reports, and a
population without classes that is the one drawn before classes existed, number for number."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from sflam import cli
from sflam.platform import models
from sflam.platform.config import ExperimentConfig, SystemConfig, load_config
from sflam.platform.data import BatchShape
from sflam.platform.errors import ConfigError
from sflam.platform.participation import select_devices
from sflam.platform.planner import RoundPlanner
from sflam.platform.results import RunResult
from sflam.platform.system import Population, class_counts, draw_classes, path_loss_db
from sflam.platform.tracking import _param
from tests.platform.test_config import ROOT

FLEET = ("devices.classes=["
         "{name: phone-2GB, share: 0.5, memory_mib: 2048, clock_hz: [0.8e9, 1.2e9]},"
         "{name: phone-6GB, share: 0.3, memory_mib: 6144, clock_hz: [1.5e9, 2.0e9], distance_m: [20, 200]},"
         "{name: tablet-12GB, share: 0.2, memory_mib: 12288, clock_hz: [2.4e9, 2.4e9], distance_m: [100, 100],"
         " shadowing_db: 0}]")


class StubFlops:
    """A FLOP table with round numbers: 1e6 forward and 2e6 backward FLOPs per padded token on the device, three
    times that on the server (the planner asks nothing else of it)."""

    hidden_size = 32

    def device_batch(self, shape: BatchShape, rank: int | None = None) -> tuple[int, int]:
        """With a LoRA rank: 1e4 more forward and 2e4 more backward FLOPs per padded token per rank."""
        extra = 0 if rank is None else 10**4 * rank * shape.padded
        return 10**6 * shape.padded + extra, 2 * 10**6 * shape.padded + 2 * extra

    def server(self, length: int) -> tuple[int, int]:
        return 3 * 10**6 * length, 6 * 10**6 * length


def planner(config: ExperimentConfig) -> RoundPlanner:
    return RoundPlanner(config, StubFlops(), adapter_bits=100_000, trains_device=True)  # type: ignore[arg-type]


def batches(devices: np.ndarray, steps: int, length: int = 16, samples: int = 8) -> dict[int, list[BatchShape]]:
    shape = BatchShape(lengths=np.full(samples, length), input_shape=(length,), mask_shape=(length,))
    return {int(k): [shape] * steps for k in devices}


def place_before_classes(cfg: SystemConfig, num_devices: int, seed: int) -> Population:
    """Population.place as it was before device classes, line for line."""
    rng = np.random.default_rng([seed, 0x5F1A, 1])
    distance = rng.uniform(cfg.min_distance_m, cfg.max_distance_m, size=num_devices)
    shadowing = rng.normal(0.0, cfg.shadowing_db, size=num_devices) if cfg.shadowing_db > 0 else \
        np.zeros(num_devices)
    clock = rng.uniform(cfg.min_clock_hz, cfg.max_clock_hz, size=num_devices)
    return Population(distance, shadowing, clock)


# --------------------------------------------------------------------------- shares, counts, the seed


def test_shares_become_exact_counts() -> None:
    assert class_counts([0.5, 0.3, 0.2], 10).tolist() == [5, 3, 2]
    assert class_counts([0.5, 0.3, 0.2], 7).tolist() == [4, 2, 1]  # quotas 3.5, 2.1, 1.4: the largest remainder
    assert class_counts([1 / 3] * 3, 100).tolist() == [34, 33, 33]  # a tie goes to the earlier class
    assert class_counts([0.95, 0.05], 10).tolist() == [10, 0]  # quotas 9.5, 0.5: a tie again
    assert class_counts([1.0], 13).tolist() == [13]
    config = load_config(None, ["data.num_devices=1000", FLEET])
    population = planner(config).population
    assert population.class_counts() == {"phone-2GB": 500, "phone-6GB": 300, "tablet-12GB": 200}
    for seed in range(5):  # every seed: the same counts, other devices
        drawn = draw_classes([0.5, 0.3, 0.2], 1000, seed)
        assert np.bincount(drawn).tolist() == [500, 300, 200]


def test_classes_are_drawn_with_the_seed_alone() -> None:
    one = planner(load_config(None, ["seed=3", "train.rounds=2", FLEET])).population
    again = planner(load_config(None, ["seed=3", "train.rounds=40", "train.devices_per_round=5", FLEET])).population
    other = planner(load_config(None, ["seed=4", FLEET])).population
    assert one.device_class is not None and again.device_class is not None and other.device_class is not None
    np.testing.assert_array_equal(one.device_class, again.device_class)  # rounds and selection change nothing
    for key in ("distance_m", "shadowing_db", "clock_hz"):
        np.testing.assert_array_equal(getattr(one, key), getattr(again, key))
    assert np.mean(one.device_class != other.device_class) > 0.3  # another seed, another fleet
    devices = np.array([0, 7, 999])
    assert one.class_names(devices) == [one.classes[int(c)].name for c in one.device_class[devices]]


# --------------------------------------------------------------------------- no classes: the numbers of before


@pytest.mark.parametrize("overrides", [[], ["system.shadowing_db=6"]], ids=["default", "shadowing"])
def test_without_classes_the_population_and_the_plan_are_those_of_before(overrides: list[str]) -> None:
    config = load_config(None, overrides)  # the default experiment: 1,000 devices, 20 a round
    assert config.devices.classes == []
    now = planner(config)
    before = place_before_classes(config.system, config.data.num_devices, config.seed)
    for key in ("distance_m", "shadowing_db", "clock_hz"):
        np.testing.assert_array_equal(getattr(now.population, key), getattr(before, key))
    assert now.population.device_class is None and now.population.class_counts() == {}
    then = planner(config)
    then.population = before
    devices = select_devices(config.seed, 0, config.data.num_devices, config.train.devices_per_round)
    work = batches(devices, config.train.local_steps)
    plan, plan_before = now.plan(0, devices, work), then.plan(0, devices, work)
    assert plan.metrics() == plan_before.metrics()
    for key in ("bits", "stage_power_w", "stage_bandwidth_hz", "latency_s", "energy_j"):
        np.testing.assert_array_equal(getattr(plan.allocation, key), getattr(plan_before.allocation, key))
    assert plan.table() == plan_before.table()
    assert "class" not in plan.table()[0]  # no class column without classes


# --------------------------------------------------------------------------- the cost model per class


def test_each_class_draws_from_its_own_clock_and_channel() -> None:
    config = load_config(None, ["data.num_devices=2000", "system.shadowing_db=3", FLEET])
    p = planner(config).population
    assert p.device_class is not None
    for c, spec in enumerate(config.devices.classes):
        members = p.device_class == c
        clock = p.clock_hz[members]
        assert spec.clock_hz[0] <= clock.min() and clock.max() <= spec.clock_hz[1], spec.name
        near, far = spec.distance_m or (config.system.min_distance_m, config.system.max_distance_m)
        assert near <= p.distance_m[members].min() and p.distance_m[members].max() <= far, spec.name
    two, six, tablet = (p.device_class == c for c in range(3))
    assert p.clock_hz[two].max() < p.clock_hz[six].min()  # the ranges do not overlap: nor do the draws
    assert np.all(p.clock_hz[tablet] == 2.4e9) and np.all(p.distance_m[tablet] == 100.0)
    assert np.all(p.shadowing_db[tablet] == 0.0)  # its own shadowing (none) over system.shadowing_db=3
    assert np.std(p.shadowing_db[two]) == pytest.approx(3.0, rel=0.15)  # the others keep the system's


def test_a_tablet_is_priced_by_its_class_clock_and_distance() -> None:
    """The tablet class: every clock 2.4 GHz, every tablet 100 m away, no shadowing. One of its devices in a round
    of 8 samples of 16 tokens: forward 8 * 16 * 1e6 FLOPs / (16 FLOPs per cycle * 2.4e9 Hz) = 3.3333e-3 s, backward
    twice that, energy kappa * (3 * 128e6 / 16) cycles * (2.4e9)^2 per step, and a channel gain of
    10^(-(128.1 + 37.6 log10 0.1) / 10) = 10^(-9.05) times its Rayleigh fading."""
    config = load_config(None, ["data.num_devices=50", "train.devices_per_round=5", FLEET])
    plan_maker = planner(config)
    p = plan_maker.population
    tablet = int(np.flatnonzero(p.device_class == 2)[0])
    devices = np.array([tablet, *np.flatnonzero(p.device_class == 0)[:4]])
    E = config.train.local_steps
    work = plan_maker.inputs(0, devices, batches(devices, E))
    assert work.forward_s[0] == pytest.approx([8 * 16 * 1e6 / (16 * 2.4e9)] * E, rel=1e-12)
    assert work.forward_s[0, 0] == pytest.approx(3.3333333333e-3, rel=1e-9)
    assert work.backward_s[0] == pytest.approx([2 * 8 * 16 * 1e6 / (16 * 2.4e9)] * E, rel=1e-12)
    assert work.compute_energy_j[0] == pytest.approx(E * 1e-28 * (3 * 128e6 / 16) * 2.4e9**2, rel=1e-12)
    fading = np.random.default_rng([config.seed, 0x5F1A, 2, 0, tablet]).exponential(1.0)
    assert work.gain[0] == pytest.approx(10 ** (-9.05) * fading, rel=1e-12)
    assert path_loss_db(np.array([100.0]))[0] == pytest.approx(90.5)
    slow = p.clock_hz[devices[1:]]  # the 2 GB phones: their own clocks, below the tablet's
    np.testing.assert_allclose(work.forward_s[1:, 0], 8 * 16 * 1e6 / (16 * slow), rtol=1e-12)
    assert np.all(work.forward_s[1:, 0] > work.forward_s[0, 0])


# --------------------------------------------------------------------------- the reports


def test_the_allocation_rows_carry_each_device_class() -> None:
    config = load_config(None, ["data.num_devices=50", "train.devices_per_round=6", FLEET])
    plan_maker = planner(config)
    devices = select_devices(config.seed, 0, 50, 6)
    rows = plan_maker.plan(0, devices, batches(devices, config.train.local_steps)).table()
    assert [list(row)[:2] for row in rows] == [["device", "class"]] * 6
    assert [row["class"] for row in rows] == plan_maker.population.class_names(devices)


def run_result(device_memory_bytes: int | None, classes: dict) -> RunResult:
    return RunResult(config={}, rounds=[], accuracy=0.5, loss=0.7, wall_s=1.0, devices=1000, devices_per_round=20,
                     device_weight_bytes=0, device_adapter={}, server_state={},
                     device_memory_bytes=device_memory_bytes, device_classes=classes)


def test_the_summary_counts_the_classes_and_the_devices_a_fixed_cut_excludes() -> None:
    classes = {"phone-2GB": {"devices": 500, "memory_mib": 2048.0}, "phone-6GB": {"devices": 300, "memory_mib": 6144.0},
               "tablet-12GB": {"devices": 200, "memory_mib": 12288.0}}
    summary = run_result(3 * 2**30, classes).summary()  # a 3 GiB peak: the 2 GB phones cannot train this part
    assert summary["device_classes"]["phone-2GB"] == {"devices": 500, "memory_mib": 2048.0, "over_memory": 500}
    assert [c["over_memory"] for c in summary["device_classes"].values()] == [500, 0, 0]
    assert summary["devices_over_memory"] == 500
    assert run_result(2048 * 2**20, classes).summary()["devices_over_memory"] == 0  # a peak at the budget fits
    assert run_result(2048 * 2**20 + 1, classes).summary()["devices_over_memory"] == 500
    unmeasured = run_result(None, classes).summary()  # nothing measured, nothing claimed
    assert unmeasured["devices_over_memory"] is None
    assert [c["over_memory"] for c in unmeasured["device_classes"].values()] == [None, None, None]
    assert "device_classes" not in run_result(3 * 2**30, {}).summary()  # no classes: the summary of before
    json.dumps(summary)


def test_the_engine_hands_the_population_classes_to_the_result() -> None:
    from sflam.platform.engine import device_classes

    config = load_config(None, ["data.num_devices=10", "train.devices_per_round=2", FLEET])
    assert device_classes(planner(config)) == {"phone-2GB": {"devices": 5, "memory_mib": 2048.0},
                                               "phone-6GB": {"devices": 3, "memory_mib": 6144.0},
                                               "tablet-12GB": {"devices": 2, "memory_mib": 12288.0}}
    assert device_classes(planner(load_config(None))) == {}


def test_the_classes_are_mlflow_params_and_survive_the_saved_config(tmp_path) -> None:
    from sflam.platform.config import save_config

    config = load_config(None, [FLEET])
    param = json.loads(_param(config.to_flat()["devices.classes"]))
    assert [c["name"] for c in param] == ["phone-2GB", "phone-6GB", "tablet-12GB"]
    assert param[1] == {"name": "phone-6GB", "share": 0.3, "memory_mib": 6144.0, "clock_hz": [1.5e9, 2.0e9],
                        "distance_m": [20.0, 200.0], "shadowing_db": None, "lora_rank": None}
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_the_fleet_example_config_has_three_classes() -> None:
    config = load_config(ROOT / "configs" / "fleet-3class.yaml")
    assert [c.name for c in config.devices.classes] == ["phone-2GB", "phone-6GB", "tablet-12GB"]
    assert sum(c.share for c in config.devices.classes) == pytest.approx(1.0, abs=1e-12)
    ranked = load_config(ROOT / "configs" / "fleet-3class-ranks.yaml")
    assert ranked.lora.rank_policy == "by-class" and ranked.lora.rank == 8
    assert [c.lora_rank for c in ranked.devices.classes] == [2, 4, 8]
    assert [dataclasses.replace(c, lora_rank=None) for c in ranked.devices.classes] == config.devices.classes


# --------------------------------------------------------------------------- config errors


BAD = [
    ("devices.classes=[{name: a, share: 0.5, memory_mib: 1, clock_hz: [1e9, 2e9]},"
     " {name: b, share: 0.4, memory_mib: 1, clock_hz: [1e9, 2e9]}]", "devices.classes[].share=[0.5, 0.4]"),
    ("devices.classes=[{name: a, share: 0.5, memory_mib: 1, clock_hz: [1e9, 2e9]},"
     " {name: a, share: 0.5, memory_mib: 1, clock_hz: [1e9, 2e9]}]", "devices.classes=['a', 'a']"),
    ("devices.classes=[{name: a, share: 1, memory_mib: 0, clock_hz: [1e9, 2e9]}]", "devices.classes[a].memory_mib=0"),
    ("devices.classes=[{name: a, share: 1, memory_mib: 9, clock_hz: [2e9, 1e9]}]", "devices.classes[a].clock_hz="),
    ("devices.classes=[{name: a, share: 1, memory_mib: 9, clock_hz: [1e9]}]", "devices.classes[a].clock_hz="),
    ("devices.classes=[{name: a, share: 1, memory_mib: 9}]", "devices.classes[a].clock_hz=[]"),
    ("devices.classes=[{name: a, share: 1, memory_mib: 9, clock_hz: [1e9, 2e9], distance_m: [0, 10]}]",
     "devices.classes[a].distance_m="),
    ("devices.classes=[{name: a, share: 1, memory_mib: 9, clock_hz: [1e9, 2e9], shadowing_db: -1}]",
     "devices.classes[a].shadowing_db=-1"),
    ("devices.classes=[{name: a, share: 1.5, memory_mib: 9, clock_hz: [1e9, 2e9]}]", "devices.classes[a].share=1.5"),
    ("devices.classes=[{share: 1, memory_mib: 9, clock_hz: [1e9, 2e9]}]", "devices.classes[].name=''"),
    ("devices.classes=[{name: a, share: lots, memory_mib: 9, clock_hz: [1e9, 2e9]}]",
     "devices.classes[0].share='lots'"),
    ("devices.classes=[{name: a, share: 1, memory_mib: 9, clock_hz: [1e9, 2e9], cut_layer: 2}]",
     "devices.classes[0].cut_layer"),
    ("devices.classes=[phone]", "devices.classes[0]='phone'"),
    ("lora.rank_policy=by-class", "lora.rank_policy='by-class' is invalid: fixed without devices.classes"),
    ("lora.rank_policy=per-device", "lora.rank_policy='per-device' is invalid: one of fixed, by-class"),
    ("devices.classes=[{name: a, share: 1, memory_mib: 9, clock_hz: [1e9, 2e9], lora_rank: 4}]",
     "devices.classes[a].lora_rank=4 is invalid: null with lora.rank_policy=fixed"),
    ("devices.classes=[{name: a, share: 1, memory_mib: 9, clock_hz: [1e9, 2e9], lora_rank: 0}]",
     "devices.classes[a].lora_rank=0 is invalid: an integer >= 1"),
    ("devices.classes=phone", "devices.classes='phone'"),
]


@pytest.mark.parametrize(("override", "names"), BAD, ids=[b[1] for b in BAD])
def test_a_bad_class_is_one_line_before_any_model_loads(override: str, names: str, capsys, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was rejected")

    monkeypatch.setattr(models, "load_model", no_loading)
    status = cli.main(["run", "-c", str(ROOT / "configs" / "smoke.yaml"), override])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1, err
    assert names in err[0]
    assert "invalid" in err[0] or "unknown" in err[0]


def test_the_share_error_says_what_the_shares_sum_to() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["devices.classes=[{name: a, share: 0.6, memory_mib: 1, clock_hz: [1e9, 1e9]},"
                           " {name: b, share: 0.6, memory_mib: 1, clock_hz: [1e9, 1e9]}]"])
    assert "shares that sum to 1 within 1e-09 (these sum to 1.2)" in str(info.value)
    two = "devices.classes=[{name: a, share: %s, memory_mib: 1, clock_hz: [1e9, 1e9]}, " \
          "{name: b, share: 0.5, memory_mib: 1, clock_hz: [1e9, 1e9]}]"
    assert load_config(None, [two % "0.4999999998"]).devices.classes[0].share == 0.4999999998  # 2e-10 short: kept
    with pytest.raises(ConfigError, match=r"these sum to 0\.999999998\)"):
        load_config(None, [two % "0.499999998"])  # 2e-9 short: refused


def test_the_allocation_csv_gets_a_class_column(tmp_path) -> None:
    from sflam.pipelines.train import write_allocation_csv
    from sflam.platform.results import RoundMetrics

    config = load_config(None, ["data.num_devices=30", "train.devices_per_round=3", FLEET])
    plan_maker = planner(config)
    devices = select_devices(config.seed, 0, 30, 3)
    metrics = RoundMetrics(round=1, train_loss=0.5, train_accuracy=0.5, samples=24, uplink_bits=1, downlink_bits=1,
                           wall_s=0.1, plan=plan_maker.plan(0, devices, batches(devices, config.train.local_steps)))
    result = run_result(None, {})
    result.rounds = [metrics]
    path = write_allocation_csv(result, tmp_path / "allocation.csv")
    assert path is not None
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:3] == ["round", "device", "class"]
    assert [row["class"] for row in rows] == plan_maker.population.class_names(devices)


def test_a_checkpoint_written_before_classes_resumes_without_them(tmp_path) -> None:
    import torch

    from sflam.platform.checkpoint import load_checkpoint, save_checkpoint
    from sflam.platform.results import Resume

    state = Resume(next_round=1, global_adapter={}, rounds=[], accuracy=0.5, loss=0.7, wall_s=1.0, strategy={},
                   server={})
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state, load_config(None), None)
    payload = torch.load(path, weights_only=False)
    del payload["config"]["devices"]  # written before the devices section existed
    torch.save(payload, path)
    assert load_checkpoint(path, load_config(None))[0].next_round == 1  # it had no classes: the default
    with pytest.raises(ConfigError, match=r"devices\.classes=.*the interrupted run's value \[\]"):
        load_checkpoint(path, load_config(None, [FLEET]))


# --------------------------------------------------------------------------- LoRA ranks per class


RANKED = ("lora.rank_policy=by-class", "devices.classes=["
          "{name: phone-2GB, share: 0.5, memory_mib: 2048, clock_hz: [1e9, 1e9], lora_rank: 2},"
          "{name: phone-6GB, share: 0.3, memory_mib: 6144, clock_hz: [1e9, 1e9], lora_rank: 4},"
          "{name: tablet-12GB, share: 0.2, memory_mib: 12288, clock_hz: [1e9, 1e9], lora_rank: 8}]")


@pytest.mark.parametrize(("overrides", "message"), [
    (("lora.rank=4",), "devices.classes[tablet-12GB].lora_rank=8 is invalid: an integer in 1..lora.rank=4"),
    ((RANKED[1].replace(", lora_rank: 4", ""),), "devices.classes[phone-6GB].lora_rank=None is invalid: an integer"),
], ids=["above-the-global-rank", "missing"])
def test_by_class_needs_every_class_rank_within_the_global_rank(overrides: tuple[str, ...], message: str,
                                                                 capsys, monkeypatch) -> None:
    """One line, before any model loads. Seen failing with the check of the rank's bound removed."""
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    status = cli.main(["run", "-c", str(ROOT / "configs" / "smoke.yaml"), *RANKED, *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0], err


def test_each_device_is_priced_at_its_class_rank() -> None:
    """Ranks 2, 4 and 8 by class, all clocks 1 GHz: by the stub, a device's forward is (1e6 + 1e4 r) FLOPs per
    token and its adapter payload its rank's (given per rank to the planner); the allocation rows and the plan
    carry each device's rank. Seen failing with every device priced at the global rank (FLOPs and payload)."""
    config = load_config(None, ["data.num_devices=50", "train.devices_per_round=6", *RANKED])
    bits = {2: 20_000, 4: 40_000, 8: 80_000}
    plan_maker = RoundPlanner(config, StubFlops(), adapter_bits=80_000, trains_device=True,  # type: ignore[arg-type]
                              rank_bits=bits)
    devices = select_devices(config.seed, 0, 50, 6)
    names = plan_maker.population.class_names(devices)
    ranks = plan_maker.ranks(devices)
    assert ranks == [{"phone-2GB": 2, "phone-6GB": 4, "tablet-12GB": 8}[n] for n in names]
    assert len(set(ranks)) >= 2
    E = config.train.local_steps
    work = plan_maker.inputs(0, devices, batches(devices, E))
    expected = np.array([8 * 16 * (1e6 + 1e4 * r) / (16 * 1e9) for r in ranks])
    np.testing.assert_allclose(work.forward_s[:, 0], expected, rtol=1e-12)
    np.testing.assert_allclose(work.backward_s[:, 0], 2 * expected, rtol=1e-12)
    problem = plan_maker.problem(0, devices, batches(devices, E), inputs=work)
    np.testing.assert_array_equal(problem.downlink_bits[:, 0], [bits[r] for r in ranks])  # the adapter down first
    plan = plan_maker.plan(0, devices, batches(devices, E))
    assert plan.ranks == tuple(ranks)
    rows = plan.table()
    assert [list(row)[:3] for row in rows] == [["device", "class", "rank"]] * 6
    assert [row["rank"] for row in rows] == ranks
    fixed = planner(load_config(None, ["data.num_devices=50", "train.devices_per_round=6", FLEET]))
    assert fixed.ranks(devices) == [] and "rank" not in fixed.plan(0, devices, batches(devices, E)).table()[0]


def test_the_summary_compares_each_class_budget_with_its_own_rank_peak() -> None:
    """A class whose own-rank peak fits its budget is not over it, even when the global rank's peak is."""
    classes = {"phone-2GB": {"devices": 500, "memory_mib": 2048.0, "lora_rank": 2, "memory_bytes": 2000 * 2**20},
               "tablet-12GB": {"devices": 200, "memory_mib": 1024.0, "lora_rank": 8, "memory_bytes": 3 * 2**30}}
    summary = run_result(3 * 2**30, classes).summary()
    assert [c["over_memory"] for c in summary["device_classes"].values()] == [0, 200]
    assert summary["devices_over_memory"] == 200
    assert summary["device_classes"]["phone-2GB"]["lora_rank"] == 2


def test_the_engine_hands_each_class_rank_and_peak_to_the_result() -> None:
    from sflam.platform.engine import device_classes

    config = load_config(None, ["data.num_devices=10", "train.devices_per_round=2", *RANKED])
    plan_maker = planner(config)
    plan_maker.memory_by_rank = {2: 100, 4: 200, 8: 300}
    assert device_classes(plan_maker) == {
        "phone-2GB": {"devices": 5, "memory_mib": 2048.0, "lora_rank": 2, "memory_bytes": 100},
        "phone-6GB": {"devices": 3, "memory_mib": 6144.0, "lora_rank": 4, "memory_bytes": 200},
        "tablet-12GB": {"devices": 2, "memory_mib": 12288.0, "lora_rank": 8, "memory_bytes": 300}}


@pytest.mark.parametrize("method", ["fl", "sl"])
def test_fl_and_sl_refuse_ranks_per_class(method: str) -> None:
    """fl trains whole models and sl hands one adapter down a chain: by-class is refused there, the split federated
    methods take it. Seen failing with the refusal removed."""
    from sflam.pipelines.baselines import method_config

    config = load_config(None, list(RANKED))
    with pytest.raises(ConfigError, match=f"lora.rank_policy='by-class' is invalid: fixed with method {method}"):
        method_config(config, method)
    for other in ("sfl", "sfl-v2", "sfl-q", "sflam"):
        assert method_config(config, other).lora.rank_policy == "by-class"
