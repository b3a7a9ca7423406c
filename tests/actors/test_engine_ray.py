"""The engine on Ray actors: every strategy and failure mode equals the reference runtime; worker errors surface."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch

from sflam.actors.runtime import RayBackend, start_watchdog
from sflam.cluster.connect import start_ray
from sflam.platform.engine import Engine
from sflam.platform.errors import RunFailed
from sflam.platform.local import run_local
from sflam.platform.strategies import build_strategy
from tests.conftest import tiny_config
from tests.equality import LOSSLESS, assert_runs_agree

pytestmark = [pytest.mark.integration, pytest.mark.equality]

# three devices, two rounds; the driver-side keys below change nothing in the actors, so one pool serves all
# lossless messages: adapters determined up to rounding and AdamW's reach (tests/equality.py); the quantized codec
# against the reference runtime: tests/actors/test_ray_runtime.py
BASE = ("quant.weights=nf4", *LOSSLESS, "train.devices_per_round=3",
        "train.rounds=2", "train.eval_every=2", "train.local_steps=3", "runtime=ray", "ray.workers=2")
CASES = {
    "fedprox": ("aggregation.strategy=fedprox", "aggregation.proximal_mu=5"),
    "fedadam": ("aggregation.strategy=fedadam", "aggregation.server_lr=0.02"),
    "fedyogi": ("aggregation.strategy=fedyogi", "aggregation.server_lr=0.02"),
    "ffa-lora": ("aggregation.strategy=ffa-lora", "aggregation.weights=shard"),
    "dropouts, availability and over-selection": ("participation.dropout=0.4", "participation.over_selection=1.0",
                              "participation.availability=0.8", "train.devices_per_round=4"),
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    start_ray(None, num_cpus=3)  # a fresh loopback cluster, never one a stale ray_current_cluster names
    watchdog = start_watchdog()  # pytest killed: the cluster's agents go with it
    config = tiny_config(*BASE, f"output_dir={tmp_path_factory.mktemp('ray')}")
    runtime = RayBackend(config)
    yield runtime, runtime.server_checkpoint()
    runtime.shutdown()
    ray.shutdown()
    watchdog.terminate()
    watchdog.wait()


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("case", list(CASES))
def test_strategies_and_failure_modes_agree_with_the_reference_runtime(pool, case: str) -> None:
    runtime, fresh_server = pool
    config = tiny_config(*BASE, *CASES[case])
    runtime.restore_server(fresh_server)
    remote = Engine(config, runtime, planner=runtime.exp.planner, data=runtime.exp.data,
                    strategy=build_strategy(config)).run()
    local = run_local(tiny_config(*BASE, *CASES[case], "runtime=local"))
    assert_runs_agree(remote, local, config)
    if case == "dropouts, availability and over-selection":
        assert sum(r.late for r in local.rounds) == 8 and sum(r.dropped for r in local.rounds) >= 1


def test_an_exception_inside_a_workers_backward_fails_the_run_with_one_line(pool) -> None:
    runtime, fresh_server = pool
    config = tiny_config(*BASE)
    runtime.restore_server(fresh_server)

    def corrupt(worker) -> None:  # a real exception in torch's backward: the activations lose their graph
        pending = worker.cohort.pending
        for step, work in pending.items():
            pending[step] = [(chunk, None if graph is None else graph.detach()) for chunk, graph in work]
        for tensor in worker.cohort.adapter.values():  # and a recomputed forward builds none
            tensor.requires_grad_(False)

    def sabotage(rt: RayBackend, round_index: int, step: int) -> None:
        if (round_index, step) == (1, 1):
            ray.get(rt.workers[1].__ray_call__.remote(corrupt))

    runtime.hooks["after_forward"] = sabotage
    try:
        with pytest.raises(RunFailed) as info:
            Engine(config, runtime, planner=runtime.exp.planner, data=runtime.exp.data,
                    strategy=build_strategy(config)).run()
    finally:
        runtime.hooks.clear()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("edge worker 1 (backward, round 2, local step 2, devices ")
    assert "RuntimeError: element 0 of tensors does not require grad" in message
    log = Path(message.split("traceback in ")[1].split(";")[0])
    assert log == Path(runtime.config.output_dir).resolve() / "sflam" / "logs" / "edge-worker-1.log"
    assert "Traceback (most recent call last)" in log.read_text() and "EdgeWorker.backward" in log.read_text()
    assert [r.round for r in info.value.partial.rounds] == [1]  # type: ignore[attr-defined]
