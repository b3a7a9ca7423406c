"""The Ray runtime equals the reference runtime; DeepSpeed ranks equal the torch engine and resume exactly;
faults lose nothing."""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import psutil
import pytest
import ray
import torch

from sflam.actors.runtime import RayBackend, RunFailed, run_ray, start_watchdog
from sflam.cluster.connect import start_ray
from sflam.platform.assembly import Experiment
from sflam.platform.checkpoint import load_checkpoint, save_checkpoint
from sflam.platform.local import engine, run_local
from sflam.platform.results import Resume, RunResult
from tests.conftest import tiny_config
from tests.equality import LOSSLESS, TIGHT, adamw_reach, assert_adamw_close, assert_runs_agree
from tests.platform.test_costs import RANKED

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    start_ray(None, num_cpus=4)  # a fresh loopback cluster, never one a stale ray_current_cluster names
    watchdog = start_watchdog()  # pytest killed: the cluster's agents go with it
    yield
    ray.shutdown()
    watchdog.terminate()
    watchdog.wait()


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[n] - b[n]).abs().max()) for n in a)


BASE = ("quant.weights=nf4", "quant.activation_bits=6", "quant.gradient_bits=8", "train.devices_per_round=5")


@pytest.mark.equality
@pytest.mark.parametrize("messages", [LOSSLESS, ()], ids=["lossless", "quantized"])
def test_ray_torch_engine_gives_the_reference_runtimes_run(messages: tuple[str, ...]) -> None:
    # the reference: devices one after another in this process; the edge workers run theirs batched. Adapters are
    # compared for lossless messages, a quantized run on what its codec's rounding leaves determined
    # (tests/equality.py)
    config = tiny_config(*BASE, *messages)
    local = engine(Experiment.build(config)).run()
    remote = run_ray(tiny_config(*BASE, *messages, "runtime=ray", "ray.workers=2"))
    assert_runs_agree(remote, local, config)
    for a, b in zip(local.rounds, remote.rounds, strict=True):
        assert a.round_latency_s == pytest.approx(b.round_latency_s)  # the same plan, priced on the driver
    assert abs(local.accuracy - remote.accuracy) <= 1 / 64  # a logit within rounding of a tie may tip one sample


@pytest.mark.equality
def test_ray_equals_the_reference_runtime_with_three_classes_of_different_ranks() -> None:
    """Three device classes at LoRA ranks 2, 4 and 8 (lossless messages): the edge workers' cohorts, two spans of
    mixed ranks, give the reference runtime's run, each device priced at its class's rank on the driver; the ranks
    act (the run is not the one at the fixed rank 8). Seen failing with the edge workers started without the
    ranks (every device at rank 8)."""
    config = tiny_config(*BASE, *LOSSLESS, *RANKED)
    local = engine(Experiment.build(config)).run()
    remote = run_ray(tiny_config(*BASE, *LOSSLESS, *RANKED, "runtime=ray", "ray.workers=2"))
    assert_runs_agree(remote, local, config)
    for a, b in zip(local.rounds, remote.rounds, strict=True):
        assert [row["rank"] for row in a.plan.table()] == [row["rank"] for row in b.plan.table()]
        assert len({row["rank"] for row in a.plan.table()}) >= 2
        assert a.round_latency_s == pytest.approx(b.round_latency_s)
    assert remote.summary()["device_classes"] == local.summary()["device_classes"]
    fixed = engine(Experiment.build(tiny_config(*BASE, *LOSSLESS))).run()
    assert max_difference(local.device_adapter, fixed.device_adapter) > 1e-4


@pytest.mark.equality
def test_ray_equals_the_reference_runtime_with_three_classes_at_their_own_cuts_and_ranks() -> None:
    """Three device classes at cuts 1, 2 and 3 and LoRA ranks 2, 4 and 8 (memory policy, lossless messages): the
    edge workers' cohorts, spans of mixed cuts and ranks, the server rank's grouped step and its merge of the blocks
    between the cuts give the reference runtime's run, each device priced at its own cut and rank on the driver.
    Seen failing with the edge workers started without the cuts (every device at the deepest cut)."""
    from tests.platform.test_split_policy import three_classes

    fleet = (*BASE, *LOSSLESS, *three_classes(*BASE, *LOSSLESS), "train.devices_per_round=8")
    config = tiny_config(*fleet)
    local = engine(Experiment.build(config)).run()
    remote = run_ray(tiny_config(*fleet, "runtime=ray", "ray.workers=2"))
    assert_runs_agree(remote, local, config)
    for a, b in zip(local.rounds, remote.rounds, strict=True):
        assert a.plan.cuts == b.plan.cuts and len(set(a.plan.cuts)) >= 2
        assert a.round_latency_s == pytest.approx(b.round_latency_s)
    assert remote.summary()["device_classes"] == local.summary()["device_classes"]
    assert {name: spec["cut"] for name, spec in local.summary()["device_classes"].items()} == {
        "small": 1, "mid": 2, "large": 3}


@pytest.mark.equality
def test_one_device_per_worker_is_allowed() -> None:
    three = (*BASE, *LOSSLESS, "train.devices_per_round=3", "train.rounds=1")
    config = tiny_config(*three, "runtime=ray", "ray.devices_per_worker=1", "ray.cpus_per_worker=0.5")
    runtime = RayBackend(config)
    try:
        assert runtime.layout.workers == 3 and runtime.layout.devices_per_worker == 1
        # a server step of more than one chunk has the node's cores (the edge workers wait for it), a small one
        # one thread; each worker keeps its one thread
        rank = runtime.ranks[0]
        assert ray.get([rank.step_threads.remote(512), rank.step_threads.remote(513)]) == [
            1, len(os.sched_getaffinity(0))]
        assert ray.get(runtime.workers[0].threads.remote()) == 1
        new, _ = runtime.run_round(0, runtime.exp.device.initial_adapter())
    finally:
        runtime.shutdown()
    config = tiny_config(*three)
    local = run_local(config)
    assert_adamw_close(new, local.device_adapter, adamw_reach(config.train.device_lr, config.train.local_steps))


DEEPSPEED_RUN = (*BASE, *LOSSLESS, "runtime=ray", "ray.workers=1", "train.rounds=3", "train.eval_every=3")


@functools.cache
def torch_engine_run() -> RunResult:
    """The torch engine's run every ZeRO stage is compared with (run once per test session)."""
    return run_ray(tiny_config(*DEEPSPEED_RUN))


# stages 1 and 2 lie between 0 (no partitioning) and 3 (everything partitioned): `make test-all` runs them
@pytest.mark.parametrize("stage", [0, pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(2, marks=pytest.mark.slow), 3])
def test_deepspeed_two_ranks_match_the_torch_engine(stage: int) -> None:
    common = DEEPSPEED_RUN
    torch_engine = torch_engine_run()
    deepspeed = run_ray(tiny_config(*common, "server.engine=deepspeed", "server.ranks=2",
                                    f"server.zero_stage={stage}"))
    assert sum(len(r.step_losses) for r in deepspeed.rounds) == 6
    # ZeRO shards the batch and reduces the gradients over two ranks: the same maths in another order
    assert_runs_agree(deepspeed, torch_engine, tiny_config(*common))
    assert abs(deepspeed.accuracy - torch_engine.accuracy) <= 1 / 64


@pytest.mark.equality
def test_a_killed_edge_worker_is_replaced_and_the_round_is_unchanged() -> None:
    config = tiny_config(*BASE, *LOSSLESS, "runtime=ray", "ray.workers=2", "train.rounds=2")
    killed: list[tuple[int, int]] = []

    def kill_worker(runtime: RayBackend, round_index: int, step: int) -> None:
        if (round_index, step) in ((0, 1), (1, 0)):  # in the middle of round 1, and at the start of round 2
            ray.kill(runtime.workers[round_index % 2], no_restart=True)
            killed.append((round_index, step))

    runtime = RayBackend(config, hooks={"after_forward": kill_worker})
    try:
        adapter = runtime.exp.device.initial_adapter()
        seen = []
        for round_index in range(2):
            adapter, metrics = runtime.run_round(round_index, adapter)
            seen.append(metrics)
        assert runtime.replaced == 2 and killed == [(0, 1), (1, 0)]
    finally:
        runtime.shutdown()
    clean = run_local(tiny_config(*BASE, *LOSSLESS, "train.rounds=2"))
    # no device lost or counted twice: the fault-free reference's adapters and losses (lossless messages: to
    # rounding and AdamW's reach, tests/equality.py)
    assert_adamw_close(adapter, clean.device_adapter, adamw_reach(config.train.device_lr, 2 * config.train.local_steps))
    for faulty, reference in zip(seen, clean.rounds, strict=True):
        assert (faulty.samples, faulty.uplink_bits) == (reference.samples, reference.uplink_bits)
        assert faulty.step_losses == pytest.approx(reference.step_losses, rel=TIGHT)


def test_a_server_failure_stops_the_run_and_keeps_completed_rounds() -> None:
    def kill_server(runtime: RayBackend, round_index: int, step: int) -> None:
        if round_index == 2 and step == 0:
            ray.kill(runtime.ranks[0], no_restart=True)

    config = tiny_config(*BASE, "runtime=ray", "ray.workers=1", "train.rounds=4", "train.eval_every=1")
    with pytest.raises(RunFailed, match="server part failed during local step 1 of round 3") as info:
        run_ray(config, hooks={"after_forward": kill_server})
    partial = info.value.partial
    assert partial is not None and [r.round for r in partial.rounds] == [1, 2]
    assert all(r.eval_accuracy is not None for r in partial.rounds)


@pytest.mark.slow  # ZeRO-3 across two nodes: tests/cluster/test_multinode.py in the default tier
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_server_state_is_checkpointed_and_resume_continues_exactly(stage: int, tmp_path: Path) -> None:
    config = tiny_config(*BASE, "runtime=ray", "ray.workers=1", "train.rounds=3", "train.eval_every=1",
                         "server.engine=deepspeed", "server.ranks=2", f"server.zero_stage={stage}",
                         "aggregation.strategy=fedadam", "aggregation.server_lr=0.02", f"output_dir={tmp_path}")
    path = tmp_path / "checkpoint.pt"

    def after_round_one(state: Resume) -> None:  # written as `sflam run` writes it, then the run goes on
        if state.next_round == 1:
            save_checkpoint(path, state, config, None)

    runtime = RayBackend(config)
    try:
        clean = runtime.engine().run(checkpoint=after_round_one)
        resume, _ = load_checkpoint(path, config)
        # ZeRO: every rank's partition; stage 0: rank 0's file (the ranks hold equal replicas)
        assert resume.server is not None and len(resume.server["deepspeed"]) >= (2 if stage else 1)
        # the ranks have trained all three rounds: the restore must bring back round 1's tensors and moments
        resumed = runtime.engine().run(resume=resume)
    finally:
        runtime.shutdown()
    assert max_difference(clean.device_adapter, resumed.device_adapter) <= 1e-6
    assert max_difference(clean.server_state, resumed.server_state) <= 1e-6
    assert [r.step_losses for r in resumed.rounds] == [r.step_losses for r in clean.rounds]
    assert [r.eval_accuracy for r in resumed.rounds] == [r.eval_accuracy for r in clean.rounds]


@pytest.mark.slow
def test_deepspeed_run_killed_by_sigkill_resumes_from_the_command_line_exactly(tmp_path: Path,
                                                                              rng: random.Random) -> None:
    """`sflam run --resume` with server.engine=deepspeed: the DeepSpeed state goes through checkpoint.pt."""
    from tests.pipelines.test_resume import ROUNDS, assert_same_run, run_to_end, start_and_kill

    args = ("runtime=ray", "ray.workers=1", "ray.local_cpus=3", "server.engine=deepspeed", "server.ranks=2",
            "server.zero_stage=3")
    processes, _ = start_and_kill(tmp_path / "killed", rng.randint(1, ROUNDS - 2), *args)
    for process in processes:  # the run's own watchdog ends them; never leave them behind if it did not
        try:
            process.kill()  # psutil checks the process is still the one seen (a reused pid is not killed)
        except psutil.NoSuchProcess:
            pass
    run_to_end(tmp_path / "killed", *args, "--resume")
    run_to_end(tmp_path / "clean", *args)
    assert_same_run(tmp_path / "killed" / "resume", tmp_path / "clean" / "resume")


@pytest.mark.equality
def test_ray_evaluation_equals_the_reference_exactly_and_survives_a_lost_worker() -> None:
    """Each edge worker evaluates its share of the batches on its own test data with the server's current
    tensors; the sums come out as the reference runtime's, also after a worker is replaced: its loss to float
    rounding (the same batches through the same code; another process may sum in another order), its accuracy
    to a sample whose logits tie within rounding."""
    config = tiny_config(*BASE, "runtime=ray", "ray.workers=2", "train.eval_batch_size=16")
    exp = Experiment.build(config)
    runtime = RayBackend(config, exp)  # the actors get the parts as built
    try:
        generator = torch.Generator().manual_seed(5)
        adapter = {n: t + 0.05 * torch.randn(t.shape, generator=generator)
                   for n, t in exp.device.initial_adapter().items()}  # a trained-looking adapter
        with torch.no_grad():  # the server part moves on after the actors got their copies
            for param in exp.server.part.parameters():
                if param.requires_grad:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
        reference = exp.evaluate(adapter)
        assert 0.0 < reference[0] < 1.0 and reference[1] > 0
        assert runtime.evaluate(adapter) != reference  # the server rank still holds the built tensors
        runtime.restore_server({"part": exp.server.state(), "optimizer": None})
        same = pytest.approx(reference, rel=TIGHT, abs=1 / 64)
        assert runtime.evaluate(adapter) == same
        ray.kill(runtime.workers[1], no_restart=True)
        assert runtime.evaluate(adapter) == same and runtime.replaced == 1
    finally:
        runtime.shutdown()
