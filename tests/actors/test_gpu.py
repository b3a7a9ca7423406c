"""GPU paths of the Ray runtime: the torch server engine on its reserved GPU, edge workers holding GPUs,
DeepSpeed over nccl. Marked `gpu`; skipped on a machine without one."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from sflam.actors.runtime import RayBackend, start_watchdog
from sflam.cluster.connect import start_ray
from sflam.platform.local import run_local
from tests.conftest import tiny_config
from tests.equality import LOSSLESS, adamw_reach, assert_adamw_close

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

BASE = ("quant.weights=nf4", "quant.activation_bits=6", "quant.gradient_bits=8", "train.devices_per_round=5",
        "train.rounds=2", "train.eval_every=2")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    start_ray(None, num_cpus=4)  # a local start sees the machine's GPUs
    watchdog = start_watchdog()
    yield
    ray.shutdown()
    watchdog.terminate()
    watchdog.wait()


def step_losses(result) -> np.ndarray:
    return np.array([loss for r in result.rounds for loss in r.step_losses])


def test_torch_server_engine_runs_on_its_gpu_and_gives_the_cpu_losses(tmp_path) -> None:
    config = tiny_config(*BASE, "runtime=ray", "ray.workers=1", "server.gpus_per_rank=1",
                         "ray.gpus_per_worker=0", f"output_dir={tmp_path}")
    runtime = RayBackend(config)
    try:
        where = ray.get(runtime.ranks[0].__ray_call__.remote(
            lambda self: (str(next(self.server.part.parameters()).device), ray.get_gpu_ids())))
        result = runtime.engine().run()
    finally:
        runtime.shutdown()
    assert where[0].startswith("cuda") and len(where[1]) == 1
    reference = run_local(tiny_config(*BASE))
    assert np.max(np.abs(step_losses(result) - step_losses(reference))) <= 1e-4


@pytest.mark.parametrize("weights", ["fp32", "nf4", "int8"])
def test_edge_workers_compute_on_their_gpus_and_give_the_cpu_losses(tmp_path, weights) -> None:
    """Two edge workers sharing one GPU (0.5 each) run the device part there; the round's losses and the final
    adapter equal the CPU reference's within float differences of the two devices' kernels. Messages are lossless
    so the adapters can be compared (tests/equality.py: a quantized codec's flips make them incomparable)."""
    overrides = (*BASE, f"quant.weights={weights}", *LOSSLESS)
    config = tiny_config(*overrides, "runtime=ray", "ray.workers=2", "ray.gpus_per_worker=0.5",
                         f"output_dir={tmp_path}")
    runtime = RayBackend(config)
    try:
        where = ray.get([w.where.remote() for w in runtime.workers])
        result = runtime.engine().run()
    finally:
        runtime.shutdown()
    assert all(device.startswith("cuda") and len(gpus) == 1 for device, gpus in where)
    reference = run_local(tiny_config(*overrides))
    assert np.max(np.abs(step_losses(result) - step_losses(reference))) <= 1e-3
    assert abs(result.accuracy - reference.accuracy) <= 0.05
    # the final adapters: every element within what AdamW can move it, all but a few within rounding of the scale
    train = config.train
    steps = train.rounds * train.local_steps
    assert_adamw_close(result.device_adapter, reference.device_adapter, adamw_reach(train.device_lr, steps),
                       what="device adapter")
    if reference.server_state:
        assert_adamw_close(result.server_state, reference.server_state, adamw_reach(train.server_lr, steps),
                           what="server state")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_deepspeed_ranks_use_nccl_on_gpus_and_give_the_torch_engines_losses(tmp_path) -> None:
    config = tiny_config(*BASE, "runtime=ray", "ray.workers=1", "server.engine=deepspeed", "server.ranks=2",
                         "server.zero_stage=2", "server.gpus_per_rank=1", f"output_dir={tmp_path}")
    runtime = RayBackend(config)
    try:
        assert runtime.backend == "nccl"
        result = runtime.engine().run()
    finally:
        runtime.shutdown()
    reference = run_local(tiny_config(*BASE))
    assert np.max(np.abs(step_losses(result) - step_losses(reference))) <= 1e-4
