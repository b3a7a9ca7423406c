"""A real multi-node Ray cluster on this machine: ranks meet across nodes, lost nodes lose nothing or stop the run.

`ray.cluster_utils.Cluster` starts a head and three worker nodes as separate raylets. Custom resources
force the layout: each DeepSpeed rank needs `server` (one on each of two server nodes), each edge worker
needs `edge` (the head and one edge node have it). One cluster and one ZeRO-3 pool serve the module; the
fixture shuts the cluster down whatever the tests do, and a watchdog ends its processes if pytest is killed.
No test depends on another's order: a test that needs the server nodes free releases the pool (the next
user builds it again), and a test that removes a node adds its replacement back and releases the pool.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from sflam.actors.runtime import RayBackend, start_watchdog
from sflam.cluster.connect import start_ray
from sflam.platform.checkpoint import load_checkpoint, save_checkpoint
from sflam.platform.config import ExperimentConfig
from sflam.platform.errors import ConfigError, RunFailed, SflamError
from sflam.platform.local import run_local
from sflam.platform.results import Resume, RunResult
from tests.conftest import tiny_config
from tests.equality import LOSSLESS, assert_runs_agree

pytestmark = pytest.mark.integration

# lossless messages: the ranks' runs are compared with the single-node run to rounding (tests/equality.py)
BASE = ("quant.weights=nf4", *LOSSLESS, "train.devices_per_round=5", "train.rounds=2", "train.eval_every=2")
ON_CLUSTER = ("runtime=ray", "ray.workers=2", "ray.resources={edge: 1}", "ray.placement_timeout_s=300",
              "server.engine=deepspeed", "server.ranks=2", "server.placement=spread", "server.resources={server: 1}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """Head (edge: 4), two server nodes (server: 1 each) and an edge node (edge: 2); the driver joins it.

    The head has room for every edge worker: Ray's default policy would keep them there, SPREAD must not."""
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {"edge": 4}})
    watchdog = None
    try:
        named = {"server-a": nodes.add_node(num_cpus=1, resources={"server": 1}),
                 "server-b": nodes.add_node(num_cpus=1, resources={"server": 1}),
                 "edge-b": nodes.add_node(num_cpus=2, resources={"edge": 2})}
        nodes.wait_for_nodes()
        start_ray(nodes.address)
        watchdog = start_watchdog()  # pytest killed: the nodes' raylets and workers go with it
        named["head"] = nodes.head_node
        yield {"cluster": nodes, "nodes": named}
    finally:
        ray.shutdown()
        nodes.shutdown()
        if watchdog is not None:
            watchdog.terminate()
            watchdog.wait()


def on_cluster(stage: int, out: Path) -> ExperimentConfig:
    return tiny_config(*BASE, *ON_CLUSTER, f"server.zero_stage={stage}", f"output_dir={out}")


def node_of(actor: Any) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


@pytest.fixture(scope="module")
def reference() -> RunResult:
    """The single-node run: the reference runtime in this process, torch server engine."""
    return run_local(tiny_config(*BASE))


class Pool:
    """The module's ZeRO-3 runtime on the cluster, built on first use and again after `release`; its fault-free
    run (and that run's round-1 checkpoint) is computed once and kept: every build gives the same run."""

    def __init__(self, out: Path) -> None:
        self.out, self.runtime, self.fresh = out, None, None
        self.checkpoint = out / "checkpoint.pt"
        self.fault_free: RunResult | None = None

    def __getitem__(self, key: str) -> Any:
        if self.runtime is None:
            self.runtime = RayBackend(on_cluster(3, self.out))
            self.fresh = self.runtime.server_checkpoint()
        return {"runtime": self.runtime, "fresh": self.fresh, "checkpoint": self.checkpoint}[key]

    def release(self) -> None:
        """Shut the runtime down: its ranks free the server nodes."""
        if self.runtime is not None:
            self.runtime.shutdown()
        self.runtime = self.fresh = None


@pytest.fixture(scope="module")
def zero3(cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    pool = Pool(tmp_path_factory.mktemp("zero3"))
    try:
        yield pool
    finally:
        pool.release()


def replace_node(cluster: dict[str, Any], name: str, pool: Pool, **node_args: Any) -> None:
    """After a test removed node `name`: a new node with its resources under its name, and the pool rebuilt on
    the next use (its actors may have moved or died), so the module's other tests find the layout they expect."""
    pool.release()
    cluster["nodes"][name] = cluster["cluster"].add_node(**node_args)
    cluster["cluster"].wait_for_nodes()


def fault_free(pool: Pool) -> RunResult:
    """The pool's run from fresh server state without faults (once per module), its round-1 checkpoint kept."""
    if pool.fault_free is None:
        runtime = pool["runtime"]

        def after_round_one(state: Resume) -> None:  # as `sflam run` writes it
            if state.next_round == 1:
                save_checkpoint(pool["checkpoint"], state, runtime.config, None)

        runtime.restore_server(pool["fresh"])
        pool.fault_free = runtime.engine().run(checkpoint=after_round_one)
    return pool.fault_free


def assert_losses_match(result: RunResult, reference: RunResult) -> None:
    """The ranks' run against the single-node reference: the same maths in another order (tests/equality.py)."""
    assert sum(len(r.step_losses) for r in result.rounds) == 4
    assert_runs_agree(result, reference, tiny_config(*BASE))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize(("override", "allowed"), [
    ("server.placement=diagonal", "one of pack, spread"),
    ("ray.placement=pack", "one of spread, default"),
    ("server.resources={CPU: 2}", "a custom resource name (CPUs and GPUs have their own keys)"),
    ("ray.resources={edge: 0}", "a number > 0"),
    ("ray.gpus_per_worker=-1", "a number >= 0"),
])
def test_placement_keys_are_checked_with_one_line(override: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        tiny_config(override)
    assert str(info.value).endswith(allowed) and "\n" not in str(info.value)


def test_actors_the_cluster_cannot_place_stop_with_one_line_and_leave_nothing(cluster, zero3,
                                                                            tmp_path: Path) -> None:
    zero3.release()  # both server nodes' `server` resources free
    fast = ("runtime=ray", "ray.placement_timeout_s=3", f"output_dir={tmp_path}")
    started = time.monotonic()
    with pytest.raises(SflamError) as shape:  # no node has it: at once, before anything is created
        RayBackend(tiny_config(*BASE, *fast, "ray.workers=1", "server.resources={gpu-node: 1}"))
    message = str(shape.value)
    assert message.startswith("no node of the cluster can host a server rank needing {'CPU': 1.0, 'gpu-node': 1.0}")
    assert "edge=2" in message and "server=1" in message and "\n" not in message
    # a shape that fits a node, but four such workers do not fit the cluster: the timeout, then nothing left
    with pytest.raises(SflamError) as busy:
        RayBackend(tiny_config(*BASE, *fast, "ray.workers=4", "server.resources={server: 1}",
                               "ray.resources={edge: 2}"))
    message = str(busy.value)
    assert message.startswith("the cluster could not start 1 server rank(s) and 4 edge worker(s) within "
                              "ray.placement_timeout_s=3 (")
    assert "_group_" not in message and "edge=6" in message and "'edge': 2.0" in message and "\n" not in message
    assert time.monotonic() - started < 60  # seconds, never a hang
    deadline = time.monotonic() + 20  # the placed rank, workers and placement group were released
    while (ray.available_resources().get("server", 0) < 2 or ray.available_resources().get("edge", 0) < 6) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("server", 0) == 2 and ray.available_resources().get("edge", 0) == 6


@pytest.mark.slow
def test_zero2_across_nodes_gives_the_single_node_losses(cluster, zero3, reference, tmp_path: Path) -> None:
    zero3.release()  # the shared ZeRO-3 pool must not hold the server nodes
    runtime = RayBackend(on_cluster(2, tmp_path))
    try:
        assert len({node_of(r) for r in runtime.ranks}) == 2
        assert_losses_match(runtime.engine().run(), reference)
    finally:
        runtime.shutdown()


def test_zero3_ranks_meet_across_nodes_and_give_the_single_node_losses(cluster, zero3, reference) -> None:
    runtime, nodes = zero3["runtime"], cluster["nodes"]
    rank_nodes = [node_of(r) for r in runtime.ranks]
    worker_nodes = [node_of(w) for w in runtime.workers]
    assert sorted(rank_nodes) == sorted([nodes["server-a"].node_id, nodes["server-b"].node_id])
    assert sorted(worker_nodes) == sorted([nodes["head"].node_id, nodes["edge-b"].node_id])  # spread
    # MASTER_ADDR is rank 0's node address, the port was found free on that node
    rank0 = next(name for name, node in nodes.items() if node.node_id == rank_nodes[0])
    assert runtime.master[0] == nodes[rank0].node_ip_address and runtime.master[1] > 0
    result = fault_free(zero3)
    assert_losses_match(result, reference)


def test_resume_of_ranks_on_two_nodes_continues_exactly(zero3) -> None:
    runtime = zero3["runtime"]
    clean = fault_free(zero3)
    resume, _ = load_checkpoint(zero3["checkpoint"], runtime.config)
    assert resume.next_round == 1 and resume.server is not None
    # DeepSpeed's own files of both ranks, written on their nodes, now in the driver's one checkpoint file
    files = sorted(resume.server["deepspeed"])
    assert any("zero_pp_rank_0_" in f for f in files) and any("zero_pp_rank_1_" in f for f in files)
    # the ranks have trained both rounds: the restore must bring back round 1's partitions and moments
    resumed = runtime.engine().run(resume=resume)
    assert max_difference(resumed.device_adapter, clean.device_adapter) <= 1e-6
    assert max_difference(resumed.server_state, clean.server_state) <= 1e-6
    assert [r.step_losses for r in resumed.rounds] == [r.step_losses for r in clean.rounds]
    assert resumed.accuracy == clean.accuracy


def test_a_lost_edge_node_is_replaced_on_the_survivors_and_the_rounds_are_unchanged(cluster, zero3) -> None:
    runtime, nodes = zero3["runtime"], cluster["nodes"]
    clean = fault_free(zero3)
    edge_b = nodes["edge-b"]
    lost = [i for i, w in enumerate(runtime.workers) if node_of(w) == edge_b.node_id]
    assert len(lost) == 1

    def remove_edge_node(rt: RayBackend, round_index: int, step: int) -> None:
        if (round_index, step) == (0, 1):  # mid-round: the node and its actors die together
            cluster["cluster"].remove_node(edge_b)

    runtime.restore_server(zero3["fresh"])
    runtime.hooks["after_forward"] = remove_edge_node
    try:
        faulty = runtime.engine().run()
        assert runtime.replaced >= 1
        assert {node_of(w) for w in runtime.workers} == {nodes["head"].node_id}  # replaced on the surviving node
    finally:
        runtime.hooks.clear()
        replace_node(cluster, "edge-b", zero3, num_cpus=2, resources={"edge": 2})
    assert max_difference(faulty.device_adapter, clean.device_adapter) <= 1e-6
    assert max_difference(faulty.server_state, clean.server_state) <= 1e-6
    for a, b in zip(faulty.rounds, clean.rounds, strict=True):
        assert a.samples == b.samples and a.step_losses == b.step_losses  # no device lost or counted twice


def test_a_lost_server_node_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(cluster, zero3,
                                                                                        tmp_path: Path) -> None:
    runtime, nodes = zero3["runtime"], cluster["nodes"]
    rank1_name = next(name for name, node in nodes.items() if node.node_id == node_of(runtime.ranks[1]))
    rank1_node = nodes[rank1_name]
    path = tmp_path / "checkpoint.pt"

    def remove_server_node(rt: RayBackend, round_index: int, step: int) -> None:
        if (round_index, step) == (1, 0):
            cluster["cluster"].remove_node(rank1_node)

    def checkpoint(state: Resume) -> None:
        save_checkpoint(path, state, runtime.config, None)

    runtime.restore_server(zero3["fresh"])
    runtime.hooks["after_forward"] = remove_server_node
    try:
        with pytest.raises(RunFailed) as info:
            runtime.engine().run(checkpoint=checkpoint)
    finally:
        runtime.hooks.clear()
        replace_node(cluster, rank1_name, zero3, num_cpus=1, resources={"server": 1})
    message = str(info.value)
    assert "\n" not in message and message.startswith("the server part failed during local step 1 of round 2")
    assert [r.round for r in info.value.partial.rounds] == [1]  # type: ignore[attr-defined]
    saved, _ = load_checkpoint(path, runtime.config)
    assert saved.next_round == 1 and [r.round for r in saved.rounds] == [1]
    assert saved.server is not None
    files = sorted(saved.server["deepspeed"])
    assert any("zero_pp_rank_0_" in f for f in files) and any("zero_pp_rank_1_" in f for f in files)
