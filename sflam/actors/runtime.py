"""The Ray runtime (`runtime: ray`): the round engine's backend on a pool of actors (docs/concepts/round-engine.md,
docs/concepts/ray-runtime.md).

The engine on the driver decides (devices, batches, bits, dropouts, weights) and the actors execute, through the
local step of `sflam.platform.protocol`: edge workers run the device part for contiguous spans of the round's
devices (`RayDevices`), the server-part group runs each local step on all of them (`RayServer`). Data moves as
object references (the global adapter is put once per round, smashed data and gradients go actor to actor); the
driver waits with `ray.wait` and awaits every call's result. A lost edge worker is replaced and its devices
replayed from the gradients the server already sent, so the round's result equals the fault-free one; an
exception inside a worker or a lost server rank stops the run with one line (its traceback in the actor's log
file) and the completed rounds and their checkpoint kept. Where the actors go and how they start:
`sflam.actors.pool`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import ray

from sflam.actors.pool import ActorPool, Hook, connect, start_watchdog
from sflam.platform.assembly import Experiment, deployed_cuts, evaluation_batches, summed, weighted_by_cut
from sflam.platform.config import ExperimentConfig
from sflam.platform.engine import Backend, Engine, ProgressFn, RoundOutcome, RoundTask
from sflam.platform.errors import RunFailed
from sflam.platform.local import leakage_of
from sflam.platform.protocol import Downlink, Uplink, local_steps
from sflam.platform.quantization import stored_weight_bytes
from sflam.platform.results import Resume, RoundMetrics, RunResult
from sflam.platform.split import overlap_names
from sflam.platform.strategies import Adapter

__all__ = ["RayBackend", "RunFailed", "connect", "run_ray", "start_watchdog"]


class RayBackend(ActorPool, Backend):
    """The Ray backend: carries out the rounds' plans on its actor pool."""

    # ------------------------------------------------------------------ a round
    def execute(self, task: RoundTask, global_adapter: Adapter) -> RoundOutcome:
        """Carry out the driver's plan of a round on the actors; the weighted partial sums come back."""
        devices = RayDevices(self, task, global_adapter)
        figures = local_steps(task.local_steps, [len(task.live(e)) for e in range(task.local_steps)], devices,
                              RayServer(self, task))
        weighted_sum, total, per_tensor = devices.finish()
        return RoundOutcome(weighted_sum=weighted_sum, total_weight=total, figures=figures, tensor_weights=per_tensor)

    def merge_server_copies(self, adapter: Adapter, task: RoundTask) -> Adapter:
        """The blocks between the cuts merged on the server rank (it holds the server's copies)."""
        pairs = overlap_names(self.exp.device.part, self.exp.server.part)
        overlap = {d: adapter[d] for d, _ in pairs}
        merged = self._server_call(task.round_index, "merging the server's copies",
                                   [self.ranks[0].merge_copies.remote(pairs, overlap, task.cuts, task.weights)])[0]
        return {**adapter, **merged}

    def engine(self) -> Engine:
        """The round engine over this pool (the driver's planner and data)."""
        return Engine(self.config, self, planner=self.exp.planner, data=self.exp.data)

    def run_round(self, round_index: int, global_adapter: Adapter) -> tuple[Adapter, RoundMetrics]:
        """One round through the engine on this pool (the new global adapter and the round's metrics)."""
        return self.engine().run_round(round_index, global_adapter)

    def evaluate(self, adapter: Adapter) -> tuple[float, float]:
        """The reference runtime's evaluation spread over the edge workers: each runs its share of the batches
        through device part, codec and server part on its own copy of the test data; the server's trained
        tensors (small) are put once, only per-batch figures come back (summed in batch order)."""
        numbers = [n for n, _ in evaluation_batches(self.config, self.exp.data)]
        adapter_ref = ray.put(adapter)
        # the server's trained tensors (adapters, head: small), put once for every worker
        server_state_ref = ray.put(self.server_state())
        groups = np.array_split(np.array(numbers), len(self.workers))

        def at(cut: int | None) -> tuple[float, float]:
            def submit(worker: Any, i: int) -> Any:
                return worker.evaluate.remote(adapter_ref, server_state_ref, [int(n) for n in groups[i]], cut)

            def recover(i: int) -> Any:
                self.workers[i] = self._new_worker(i)
                self.replaced += 1
                return submit(self.workers[i], i)

            refs = {i: submit(self.workers[i], i) for i, g in enumerate(groups) if len(g)}
            results = self._gather(refs, recover, lambda i: f"edge worker {i} (evaluation)")
            return summed([figures for i in sorted(results) for figures in results[i]])

        if not self.config.split.mixed:
            return at(None)
        shares = deployed_cuts(self.exp.planner)
        return weighted_by_cut({cut: at(cut) for cut in shares}, shares)

    def initial_adapter(self) -> Adapter:
        return self.exp.device.initial_adapter()

    def server_state(self) -> Adapter:
        return self._server_call(-1, "state", [r.state.remote() for r in self.ranks])[0]

    def server_checkpoint(self) -> dict[str, Any] | None:
        if self.config.server.engine == "torch":
            return self._server_call(-1, "checkpoint", [self.ranks[0].checkpoint.remote()])[0]
        # DeepSpeed: every rank writes its own partition; the files of all ranks make the group's checkpoint
        states = self._server_call(-1, "checkpoint", [r.checkpoint.remote() for r in self.ranks])
        return {"deepspeed": {name: data for state in states for name, data in state["deepspeed"].items()}}

    def leakage(self, adapter: Adapter) -> dict[str, float] | None:
        """The monitoring attacks on the driver, against its own built device part (the actors hold copies)."""
        return leakage_of(self, adapter)

    def restore_server(self, state: dict[str, Any]) -> None:
        self._server_call(-1, "restore", [r.restore.remote(state) for r in self.ranks])

    def result_fields(self) -> dict[str, Any]:
        # the kernels the edge workers ran (their nodes' CPUs may differ from the driver's)
        reported = ray.get([w.kernels.remote() for w in self.workers])
        kernels = {key: " | ".join(sorted({r[key] for r in reported})) for key in reported[0]}
        return {"device_weight_bytes": stored_weight_bytes(self.exp.device.part),
                "device_memory_bytes": self.exp.memory.total, "memory": self.exp.memory, "kernels": kernels}

    close = ActorPool.shutdown



def run_ray(config: ExperimentConfig, progress: ProgressFn | None = None, experiment: Experiment | None = None,
            hooks: dict[str, Hook] | None = None, announce: Callable[[str], None] | None = None,
            checkpoint: Callable[[Resume], None] | None = None, resume: Resume | None = None) -> RunResult:
    """Every round of an experiment on the Ray runtime; the same result as `run_local` for the same seed."""
    runtime = RayBackend(config, experiment, hooks)
    if announce is not None:
        announce(runtime.layout.describe())
    try:
        return runtime.engine().run(progress, checkpoint, resume)
    finally:
        runtime.shutdown()


class RayDevices:
    """The device side on the edge workers: each worker runs a contiguous span of the round's devices as one cohort.
    Every call's result is awaited; a worker lost in the round is replaced and its devices replayed from the
    gradients the server already sent (`RayBackend._replace`), so nothing is lost or counted twice."""

    def __init__(self, backend: RayBackend, task: RoundTask, global_adapter: Adapter) -> None:
        self.backend, self.task = backend, task
        r = task.round_index
        devices = self.devices = [int(k) for k in task.devices]
        workers = len(backend.workers)
        edges = np.linspace(0, len(devices), workers + 1).round().astype(int)
        self.spans = [range(int(edges[i]), int(edges[i + 1])) for i in range(workers)]
        self.active = [i for i, span in enumerate(self.spans) if len(span)]
        global_ref = ray.put(global_adapter)  # once per round, shared by every worker
        self.start_args = {i: (r, [devices[j] for j in self.spans[i]], [task.bits[j] for j in self.spans[i]],
                               [task.steps[j] for j in self.spans[i]], [task.weights[j] for j in self.spans[i]],
                               {devices[j]: task.indices[devices[j]] for j in self.spans[i]}, global_ref,
                               task.lr_factor, task.fit, [task.ranks[j] for j in self.spans[i]] if task.ranks else None,
                               [task.cuts[j] for j in self.spans[i]] if task.cuts else None)
                           for i in self.active}
        # each worker's slice (offset, count) of every step's gradients: its devices still taking part
        self.slices: list[list[tuple[int, int]]] = []
        for step in range(task.local_steps):
            counts = [sum(task.steps[j] > step for j in self.spans[i]) for i in range(workers)]
            self.slices.append([(int(sum(counts[:i])), counts[i]) for i in range(workers)])
        self.history: list[list[Any]] = []  # every step's gradient references, for a replacement's replay
        # the calls whose results nobody needs (start, backward), awaited with the next call's results
        self.pending = {i: backend.workers[i].start.remote(*self.start_args[i]) for i in self.active}
        self.previous = partial(self.where, step=None, call="start")

    def where(self, i: int, step: int | None = None, call: str = "") -> str:
        chunk = [self.devices[j] for j in self.spans[i]]
        at = f", local step {step + 1}" if step is not None else ""
        return f"edge worker {i} ({call}, round {self.task.round_index + 1}{at}, devices {chunk[0]}..{chunk[-1]})"

    def recover_with(self, step: int, call: Callable[[Any, int], Any]) -> Callable[[int], Any]:
        def recover(i: int) -> Any:
            self.backend._replace(i, self.start_args[i], self.history[:step], self.slices)
            return call(self.backend.workers[i], i)
        return recover

    def forward(self, step: int) -> Uplink:
        """Every worker's forward in parallel; the messages go to the server ranks by reference as one object per
        worker, only their sizes come back here."""
        backend, message_refs = self.backend, {}

        def submit(worker: Any, i: int) -> Any:
            messages_ref, bits_ref = worker.forward.options(num_returns=2).remote(step)
            message_refs[i] = messages_ref
            return bits_ref

        sizes = {i: submit(backend.workers[i], i) for i in self.active}
        if "after_forward" in backend.hooks:
            backend.hooks["after_forward"](backend, self.task.round_index, step)
        sizes = backend._gather(sizes, self.recover_with(step, submit), partial(self.where, step=step, call="forward"))
        backend._await(self.pending, self.previous)
        return Uplink(messages=[message_refs[i] for i in self.active], bits=sum(sizes.values()))

    def backward(self, step: int, downlink: Downlink) -> None:
        """Every worker's backward with its slice of the server ranks' gradients (awaited with the next call)."""
        grad_refs = downlink.gradients
        self.history.append(grad_refs)
        workers = self.backend.workers
        self.pending = {i: workers[i].backward.remote(step, self.slices[step][i][0], *grad_refs)
                        for i in self.active}
        self.previous = partial(self.where, step=step, call="backward")

    def finish(self) -> tuple[Adapter, float, dict[str, float] | None]:
        """The weighted partial sums of every worker, added up, their total weight and (devices at several cuts)
        each tensor's."""
        backend, steps = self.backend, len(self.history)
        finished = backend._gather({i: backend.workers[i].finish.remote() for i in self.active},
                                   self.recover_with(steps, lambda w, i: w.finish.remote()),
                                   partial(self.where, step=None, call="finish"))
        backend._await(self.pending, self.previous)
        total = sum(finished[i][1] for i in self.active)
        sums = [finished[i][0] for i in self.active if finished[i][1] > 0]
        added: Adapter = {}
        for s in sums:  # in worker order; a worker whose devices hold none of a block's tensors sends none of it
            for n, t in s.items():
                added[n] = added[n] + t if n in added else t
        per_tensor: dict[str, float] | None = None
        if self.task.cuts:
            per_tensor = {}
            for i in self.active:
                for n, w in (finished[i][3] or {}).items():
                    per_tensor[n] = per_tensor.get(n, 0.0) + w
        return added, float(total), per_tensor


class RayServer:
    """The server side on the server ranks: every rank runs every step on its shard; smashed data and gradients
    travel by reference."""

    def __init__(self, backend: RayBackend, task: RoundTask) -> None:
        self.backend, self.task = backend, task

    def step(self, step: int, uplink: Uplink) -> Downlink:
        r = self.task.round_index
        outs = [rank.step.options(num_returns=2).remote(r, step, self.task.lr_factor, *uplink.messages)
                for rank in self.backend.ranks]
        stats = self.backend._server_call(r, f"local step {step + 1}", [o[0] for o in outs])
        samples = sum(s[2] for s in stats)
        return Downlink(gradients=[o[1] for o in outs], loss=sum(s[0] for s in stats) / samples,
                        correct=sum(s[1] for s in stats), samples=samples, bits=sum(s[3] for s in stats))
