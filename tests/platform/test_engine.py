"""The round engine in the reference runtime: strategies, availability, dropouts, over-selection
(docs/concepts/round-engine.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sflam.platform.assembly import Experiment
from sflam.platform.engine import Engine
from sflam.platform.local import LocalBackend
from sflam.platform.participation import available_devices
from sflam.platform.strategies import build_strategy, weighted_average
from sflam.platform.system import Population
from tests.conftest import tiny_config

SMALL = ("train.devices_per_round=3", "train.rounds=2", "train.eval_every=2", "lora.server=false")


@pytest.fixture(scope="module")
def experiment() -> Experiment:
    return Experiment.build(tiny_config(*SMALL))


def engine_for(exp: Experiment, *overrides: str) -> Engine:
    config = tiny_config(*SMALL, *overrides)
    exp.config = config  # same model, data and cost model; the overrides change only driver decisions
    exp.planner.config = config
    return Engine(config, LocalBackend(exp), planner=exp.planner, data=exp.data, strategy=build_strategy(config))


def recorded_round(engine: Engine, round_index: int, global_adapter):
    """Run a round and record every device's final adapter as the backend produced it (its batched cohort)."""
    device = engine.backend.exp.device  # type: ignore[attr-defined]
    finals: dict[int, dict[str, torch.Tensor]] = {}
    cohorts = []
    original = device.start

    def record(*args, **kwargs):
        cohorts.append(original(*args, **kwargs))
        return cohorts[-1]

    device.start = record
    try:
        task, _, _ = engine.configure(round_index)
        new, metrics = engine.run_round(round_index, global_adapter)
    finally:
        device.start = original
    for group in cohorts:
        for i, k in enumerate(group.devices):
            finals[k] = group.adapter_of(i)
    return task, new, metrics, finals


def test_fedadam_applies_the_server_step_to_fedavgs_average(experiment: Experiment) -> None:
    start = experiment.device.initial_adapter()
    server = experiment.server.checkpoint()
    task, fedavg_new, _, finals = recorded_round(engine_for(experiment), 0, start)
    experiment.server.restore(server)
    adam = engine_for(experiment, "aggregation.strategy=fedadam", "aggregation.server_lr=0.05")
    adam_new, _ = adam.run_round(0, start)
    experiment.server.restore(server)
    average = weighted_average([finals[int(k)] for k in task.devices], task.weights)
    for name in average:  # FedAvg's new global is the trained-sample-weighted average of the three devices
        assert torch.allclose(fedavg_new[name], average[name], atol=1e-7)
    # Reddi et al.'s first server step written out: m = (1 - b1) d, v = (1 - b2) d^2, x + lr m / (sqrt(v) + tau)
    delta = {n: average[n] - start[n] for n in average}
    expected = {n: start[n] + 0.05 * (0.1 * d) / ((0.01 * d * d).sqrt() + 1e-3) for n, d in delta.items()}
    assert max(float((adam_new[n] - expected[n]).abs().max()) for n in expected) <= 1e-6
    assert task.weights == [float(sum(len(b) for b in task.indices[int(k)])) for k in task.devices]


def test_fedprox_pulls_devices_towards_the_global_adapter(experiment: Experiment) -> None:
    start = experiment.device.initial_adapter()
    server = experiment.server.checkpoint()
    moved = {}
    for strategy in ("fedavg", "fedprox"):
        new, _ = engine_for(experiment, f"aggregation.strategy={strategy}", "aggregation.proximal_mu=50",
                            "train.local_steps=3").run_round(0, start)
        experiment.server.restore(server)
        moved[strategy] = sum(float((new[n] - start[n]).norm()) for n in new)
    assert moved["fedprox"] < 0.9 * moved["fedavg"]


def test_ffa_lora_keeps_a_frozen_and_trains_b(experiment: Experiment) -> None:
    start = experiment.device.initial_adapter()
    server = experiment.server.checkpoint()
    new, _ = engine_for(experiment, "aggregation.strategy=ffa-lora").run_round(0, start)
    experiment.server.restore(server)
    a_names = [n for n in start if "lora_A" in n]
    b_names = [n for n in start if "lora_B" in n]
    assert a_names and b_names
    assert all(torch.equal(new[n], start[n]) for n in a_names)
    assert all(not torch.equal(new[n], start[n]) for n in b_names)


def test_a_dropped_device_never_enters_the_average(experiment: Experiment) -> None:
    start = experiment.device.initial_adapter()
    server = experiment.server.checkpoint()
    engine = engine_for(experiment, "participation.dropout=0.5", "train.devices_per_round=6", "train.local_steps=3")
    for round_index in range(4):  # rounds with at least one dropout and one finisher
        task, _, counts = engine.configure(round_index)
        if 0 < counts["dropped"] < len(task.devices):
            break
    assert 0 < counts["dropped"] < len(task.devices)
    task, new, metrics, finals = recorded_round(engine, round_index, start)
    experiment.server.restore(server)
    finished = [i for i, s in enumerate(task.steps) if s == 3]
    assert [w == 0 for w in task.weights] == [s < 3 for s in task.steps]
    expected = weighted_average([finals[int(task.devices[i])] for i in finished], [task.weights[i] for i in finished])
    assert max(float((new[n] - expected[n]).abs().max()) for n in expected) <= 1e-6
    assert (metrics.selected, metrics.finished, metrics.dropped, metrics.late) == (
        6, len(finished), 6 - len(finished), 0)
    # the server trained only on the steps the dropped devices took part in
    assert metrics.samples == sum(len(task.indices[int(k)][0]) * s for k, s in zip(task.devices, task.steps,
                                                                                      strict=True))


def test_over_selection_keeps_the_k_fastest_by_the_cost_model(experiment: Experiment, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Six devices available (a trace), K = 3 with over-selection 1.0: all six are candidates. Every device at the
    same distance without shadowing; devices 1, 7 and 13 clocked at 0.1-0.3 MHz (seconds of computation per step),
    4, 10 and 16 at 2 GHz (milliseconds): the three that finish first are 4, 10 and 16, neither the first three
    candidates nor the last."""
    trace = tmp_path / "trace.csv"
    trace.write_text("device,round\n" + "".join(f"{k},1\n" for k in (1, 4, 7, 10, 13, 16)))
    clock = np.full(20, 2e9)
    clock[[1, 7, 13]] = [3e5, 1e5, 2e5]
    monkeypatch.setattr(experiment.planner, "population", Population(np.full(20, 100.0), np.zeros(20), clock))
    engine = engine_for(experiment, "participation.over_selection=1.0", "train.devices_per_round=3",
                        f"participation.trace={trace}")
    task, plan, counts = engine.configure(1)
    assert task.devices.tolist() == [4, 10, 16]
    assert counts == {"selected": 6, "late": 3, "dropped": 0, "finished": 3}
    assert list(plan.devices) == [4, 10, 16]  # the round is priced for the devices that run


def test_availability_probability_and_trace(experiment: Experiment, tmp_path: Path) -> None:
    config = tiny_config(*SMALL, "participation.availability=0.3")
    pools = [available_devices(config, r) for r in range(3)]
    assert all(0 < len(p) < 20 for p in pools) and not np.array_equal(pools[0], pools[1])
    engine = engine_for(experiment, "participation.availability=0.3")
    for r in range(3):
        task, _, _ = engine.configure(r)
        assert set(task.devices.tolist()) <= set(pools[r].tolist())
    trace = tmp_path / "trace.csv"
    trace.write_text("device,round\n4,0\n9,0\n17,0\n2,1\n")
    engine = engine_for(experiment, f"participation.trace={trace}")
    assert engine.configure(0)[0].devices.tolist() == [4, 9, 17]
    assert engine.configure(1)[0].devices.tolist() == [2]
    task, plan, _ = engine.configure(2)  # nobody available: the round carries the adapter over
    assert len(task.devices) == 0 and plan is None
    start = experiment.device.initial_adapter()
    new, metrics = engine.run_round(2, start)
    assert all(torch.equal(new[n], start[n]) for n in start) and metrics.selected == 0
