"""The Ray runtime equals the reference runtime; DeepSpeed ranks equal the torch engine; faults lose nothing."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from sflam.actors.runtime import RayRuntime, RunFailed, run_ray
from sflam.platform.engine import Engine
from sflam.platform.runtime import Experiment, LocalExecutor, run_local
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[n] - b[n]).abs().max()) for n in a)


BASE = ("quant.weights=nf4", "quant.activation_bits=6", "quant.gradient_bits=8", "train.devices_per_round=5")


def test_ray_torch_engine_gives_the_reference_runtimes_adapters() -> None:
    # the reference: devices one after another in this process; the edge workers run theirs batched
    config = tiny_config(*BASE)
    local = Engine(config, LocalExecutor(Experiment.build(config), batched=False)).run()
    remote = run_ray(tiny_config(*BASE, "runtime=ray", "ray.workers=2"))
    assert max_difference(local.device_adapter, remote.device_adapter) <= 1e-5
    assert max_difference(local.server_state, remote.server_state) <= 1e-5
    for a, b in zip(local.rounds, remote.rounds, strict=True):
        assert a.step_losses == pytest.approx(b.step_losses, abs=1e-6)
        assert (a.samples, a.uplink_bits, a.downlink_bits) == (b.samples, b.uplink_bits, b.downlink_bits)
        assert a.round_latency_s == pytest.approx(b.round_latency_s)
    assert local.accuracy == pytest.approx(remote.accuracy, abs=1e-9)


def test_one_device_per_worker_is_allowed() -> None:
    config = tiny_config(*BASE, "runtime=ray", "ray.devices_per_worker=1", "train.rounds=1", "ray.cpus_per_worker=0.5")
    runtime = RayRuntime(config)
    try:
        assert runtime.layout.workers == 5 and runtime.layout.devices_per_worker == 1
        new, _ = runtime.run_round(0, runtime.exp.device.initial_adapter())
    finally:
        runtime.shutdown()
    local = run_local(tiny_config(*BASE, "train.rounds=1"))
    assert max_difference(new, local.device_adapter) <= 1e-5


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_two_ranks_match_the_torch_engine(stage: int) -> None:
    common = (*BASE, "runtime=ray", "ray.workers=1", "train.rounds=3", "train.eval_every=3")
    torch_engine = run_ray(tiny_config(*common))
    deepspeed = run_ray(tiny_config(*common, "server.engine=deepspeed", "server.ranks=2",
                                    f"server.zero_stage={stage}"))
    ours = [loss for r in deepspeed.rounds for loss in r.step_losses]
    reference = [loss for r in torch_engine.rounds for loss in r.step_losses]
    assert len(ours) == 6
    assert np.max(np.abs(np.array(ours) - np.array(reference))) <= 1e-4
    assert max_difference(torch_engine.device_adapter, deepspeed.device_adapter) <= 1e-3
    assert deepspeed.accuracy == pytest.approx(torch_engine.accuracy, abs=0.02)


def test_a_killed_edge_worker_is_replaced_and_the_round_is_unchanged() -> None:
    config = tiny_config(*BASE, "runtime=ray", "ray.workers=2", "train.rounds=2")
    killed: list[tuple[int, int]] = []

    def kill_worker(runtime: RayRuntime, round_index: int, step: int) -> None:
        if (round_index, step) in ((0, 1), (1, 0)):  # in the middle of round 1, and at the start of round 2
            ray.kill(runtime.workers[round_index % 2], no_restart=True)
            killed.append((round_index, step))

    runtime = RayRuntime(config, hooks={"after_forward": kill_worker})
    try:
        adapter = runtime.exp.device.initial_adapter()
        seen = []
        for round_index in range(2):
            adapter, metrics = runtime.run_round(round_index, adapter)
            seen.append(metrics)
        assert runtime.replaced == 2 and killed == [(0, 1), (1, 0)]
    finally:
        runtime.shutdown()
    clean = run_local(tiny_config(*BASE, "train.rounds=2"))
    assert max_difference(adapter, clean.device_adapter) <= 1e-5
    for faulty, reference in zip(seen, clean.rounds, strict=True):
        assert faulty.samples == reference.samples  # no device lost or counted twice
        assert faulty.step_losses == pytest.approx(reference.step_losses, abs=1e-6)


def test_a_server_failure_stops_the_run_and_keeps_completed_rounds() -> None:
    def kill_server(runtime: RayRuntime, round_index: int, step: int) -> None:
        if round_index == 2 and step == 0:
            ray.kill(runtime.ranks[0], no_restart=True)

    config = tiny_config(*BASE, "runtime=ray", "ray.workers=1", "train.rounds=4", "train.eval_every=1")
    with pytest.raises(RunFailed, match="server part failed during local step 1 of round 3") as info:
        run_ray(config, hooks={"after_forward": kill_server})
    partial = info.value.partial
    assert partial is not None and [r.round for r in partial.rounds] == [1, 2]
    assert all(r.eval_accuracy is not None for r in partial.rounds)
