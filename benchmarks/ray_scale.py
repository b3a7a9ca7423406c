"""Many devices per round: the batched cohort against devices one after another and against one single-adapter
pass, and the Ray runtime's wall time per round and peak host memory.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_scale.py [--sizes 10 100 1000 10000] [--ray-only] [--out PATH]
     OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_scale.py --fleet --sizes 1000 [--out PATH]
Work: tiny-llama on the synthetic task, every device selected every round (K devices per round), 12 samples
each, 2 local steps of mini-batch 4, nf4 device weights, 8-bit smashed data, torch server part, one torch
thread. For each K, in this process on the same round's plan (server part restored before each path):
- batched: the local runtime's executor, all devices as one cohort (the default);
- device by device: the same protocol over a `DeviceSide` that runs each device alone (its forward, backward and
  AdamW), as `tests/reference.py` does;
- single adapter: one adapter over all the round's samples as one batch per local step (no per-device work at
  all: the machine's limit for this work).
Each is the executor's time for the round's local steps (device part, codec and server part); the driver's
planning of the round (selection, batches, cost model) is the same for every path and reported apart; batched and
single adapter alternate (`--repeats`) and keep their fastest run. Sizes
from `--one-step-from` on time the first local step only (device by device would take minutes). Ray: the full
round (planning included, no evaluation) on two edge workers of one thread and one server rank (with the
node's CPUs for steps of more than 512 samples, `server.threads: 0`), the median over the rounds after the
first, and where that round's time went: the driver's planning, its waits for the edge workers and for the
server part. Peak host memory: the largest sum of
proportional set sizes (PSS: shared pages split between the processes that map them) over this process and
every process below it (the Ray cluster it starts), sampled during the Ray run every half second, or less often
when one sample costs more than a twentieth of that time in CPU (reading PSS walks every page of every process).

`--fleet`: the round (local and Ray runtimes) of a three-class fleet (memory policy: classes at cuts 1, 2 and 3 of
tiny-llama's four blocks and LoRA ranks 2, 4 and 8, shares 0.4/0.3/0.3) beside homogeneous rounds with every device
at cut 1 and at cut 3 (rank 8), the same devices, data and plan otherwise, measured one after another in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from sflam.actors.memory import release_freed_memory
from sflam.platform.build import quiet_libraries
from sflam.platform.config import ExperimentConfig, load_config


def scenario(K: int, rounds: int, runtime: str) -> list[str]:
    return ["model.name=tiny-llama", "data.dataset=synthetic", f"data.num_devices={K}",
            f"data.synthetic_samples={max(12 * K, 200)}", f"train.devices_per_round={K}", f"train.rounds={rounds}",
            "train.local_steps=2", "train.batch_size=4", f"train.eval_every={rounds}", "data.eval_samples=256",
            "quant.weights=nf4", "quant.activation_bits=8", "quant.gradient_bits=8", f"runtime={runtime}",
            "ray.workers=2", "ray.threads_per_worker=1", "threads=1", "allocation.policy=equal"]


class PeakMemory:
    """Samples the summed PSS of this process and all its descendants."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            started = time.thread_time()
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            # reading PSS walks every page of every process (about 50 ms of CPU per GiB): at most a twentieth of
            # one core goes to sampling, which would otherwise slow the measured runs on a small machine
            self._stop.wait(max(0.5, 20 * (time.thread_time() - started)))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def single_adapter(exp, task, global_adapter) -> float:  # type: ignore[no-untyped-def]
    """One adapter over all the round's samples as one batch per local step; seconds for the local steps."""
    from sflam.platform.data import collate

    devices = [int(k) for k in task.devices]
    batches = []
    for step in range(max(task.steps)):
        live = task.live(step)
        indices = np.concatenate([task.indices[devices[i]][step] for i in live])
        batches.append(collate(exp.data.train, indices, exp.data.pad_token_id))
    started = time.perf_counter()
    group = exp.device.start([0], global_adapter, task.lr_factor, task.fit)
    for step, batch in enumerate(batches):
        messages = exp.device.forward(group, [0], [batch], task.round_index, step, [task.bits[0]])
        result = exp.server.step(messages, task.round_index, step)
        exp.device.backward(group, step, result.gradients)
    return time.perf_counter() - started


class DeviceByDevice:
    """The lockstep with every device a cohort of its own (what batching replaces): the protocol's device side."""

    def __init__(self, exp, task, global_adapter) -> None:  # type: ignore[no-untyped-def]
        from sflam.platform.local import CohortDevices, collated

        devices = [int(k) for k in task.devices]
        batches = collated(task, exp.data.train, exp.data.pad_token_id, devices)
        self.sides = [CohortDevices(exp.device, exp.device.start([k], global_adapter, task.lr_factor, task.fit),
                                    task, [i], batches) for i, k in enumerate(devices)]

    def forward(self, step: int):  # type: ignore[no-untyped-def]
        from sflam.platform.protocol import Uplink

        ups = [side.forward(step) for side in self.sides if side.live(step)]
        return Uplink(messages=[m for up in ups for m in up.messages], bits=sum(up.bits for up in ups))

    def backward(self, step: int, downlink) -> None:  # type: ignore[no-untyped-def]
        import dataclasses as dc

        gradients = iter(downlink.gradients)
        for side in self.sides:
            if side.live(step):
                side.backward(step, dc.replace(downlink, gradients=[next(gradients)]))


def device_by_device(exp, task, global_adapter) -> None:  # type: ignore[no-untyped-def]
    from sflam.platform.local import InProcessServer
    from sflam.platform.protocol import local_steps

    exp.server.set_lr_factor(task.lr_factor)
    local_steps(task.local_steps, [len(task.live(e)) for e in range(task.local_steps)],
                DeviceByDevice(exp, task, global_adapter), InProcessServer(exp.server, task.round_index))


def local_paths(config: ExperimentConfig, one_step: bool, repeats: int) -> dict[str, float]:
    """Seconds of the batched, device-by-device and single-adapter local steps on one round's plan."""
    from sflam.platform.assembly import Experiment
    from sflam.platform.local import LocalBackend, engine

    exp = Experiment.build(config)
    fresh = exp.server.checkpoint()
    adapter = exp.device.initial_adapter()
    batched = LocalBackend(exp)
    warm, _, _ = engine(exp).configure(0)
    n = min(len(warm.devices), 100)  # warm-up on a hundred devices: first calls of every kernel
    batched.execute(dataclasses.replace(warm, devices=warm.devices[:n], bits=warm.bits[:n], steps=warm.steps[:n],
                                        weights=warm.weights[:n]), adapter)
    started = time.perf_counter()
    task, _, _ = engine(exp).configure(1)
    configure_s = time.perf_counter() - started
    if one_step:
        task = dataclasses.replace(task, steps=[1] * len(task.steps))
    out = {"configure": configure_s}
    # the machine is shared: batched and single adapter alternate `repeats` times and keep their fastest
    order = [("batched", lambda: batched.execute(task, adapter)),
             ("single", lambda: single_adapter(exp, task, adapter))] * repeats
    for name, run in [*order, ("reference", lambda: device_by_device(exp, task, adapter))]:
        exp.server.restore(fresh)
        started = time.perf_counter()
        run()
        out[name] = min(out.get(name, float("inf")), time.perf_counter() - started)
    return out


PHASES = {"configure": "planning", "_gather": "edge workers", "_await": "edge workers",
          "_server_call": "server part"}


def timed(owner: object, name: str, into: dict[str, float]) -> None:
    """Adds the wall seconds of every call of owner.name to into[PHASES[name]] (the driver waits in these)."""
    call = getattr(owner, name)

    def run(*args, **kwargs):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            into[PHASES[name]] = into.get(PHASES[name], 0.0) + time.perf_counter() - started

    setattr(owner, name, run)


def fleet(K: int) -> list[str]:
    """The three-class fleet's overrides: each class's budget between the measured device-part peaks, so the memory
    policy puts it at cut 1, 2 or 3 (the peaks measured on a local build of the same scenario)."""
    from sflam.platform.assembly import Experiment

    probe = ["split.policy=memory", "split.candidates=[1,2,3]",
             "devices.classes=[{name: all, share: 1, memory_mib: 100000, clock_hz: [1e9, 2e9]}]"]
    peak = {c: b / 2**20 for c, b in Experiment.build(load_config(None, scenario(min(K, 50), 1, "local") + probe))
            .planner.memory_by_cut.items()}
    return ["split.policy=memory", "split.candidates=[1,2,3]", "lora.rank_policy=by-class", "devices.classes=["
            f"{{name: small, share: 0.4, memory_mib: {peak[2] - 0.01}, clock_hz: [1e9, 1e9], lora_rank: 2}},"
            f"{{name: mid, share: 0.3, memory_mib: {peak[3] - 0.01}, clock_hz: [1.5e9, 1.5e9], lora_rank: 4}},"
            f"{{name: large, share: 0.3, memory_mib: {peak[3] + 1}, clock_hz: [2e9, 2e9], lora_rank: 8}}]"]


def local_round(K: int, rounds: int, extra: list[str]) -> float:
    """The local runtime's seconds per round (planning included, no evaluation), the median after the first."""
    from sflam.platform.assembly import Experiment
    from sflam.platform.local import engine

    exp = Experiment.build(load_config(None, scenario(K, rounds, "local") + extra))
    run = engine(exp)
    adapter, times = exp.device.initial_adapter(), []
    for r in range(rounds):
        adapter, metrics = run.run_round(r, adapter)
        times.append(metrics.wall_s)
    return float(np.median(times[1:]))


def fleet_table(sizes: list[int], rounds: int, out: Path) -> None:
    """--fleet: homogeneous rounds at cuts 1 and 3 and the three-class fleet's, side by side, on both runtimes."""
    lines = ["| runtime | devices per round | cut 1, all devices (s/round) | cut 3, all devices (s/round) | three "
             "classes, cuts 1/2/3, ranks 2/4/8 (s/round) | fleet / cut 3 | fleet / cut 1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for K in sizes:
        for runtime, timer in (("local", local_round), ("ray", lambda *a: ray_round(*a)[0])):
            cut1 = timer(K, rounds, ["split.cut_layer=1"])
            cut3 = timer(K, rounds, ["split.cut_layer=3"])
            mixed = timer(K, rounds, fleet(K))
            lines.append(f"| {runtime} | {K} | {cut1:.2f} | {cut3:.2f} | {mixed:.2f} | {mixed / cut3:.2f} | "
                         f"{mixed / cut1:.2f} |")
            print(lines[-1], flush=True)
            gc.collect()
            release_freed_memory()
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python benchmarks/ray_scale.py "
               f"--fleet --sizes {' '.join(map(str, sizes))} --ray-rounds {rounds} --out {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".md.tmp")
    partial.write_text(f"Command: {command}\n\n" + "\n".join(lines) + "\n")
    partial.replace(out)  # atomic


def ray_round(K: int, rounds: int, extra: list[str] | None = None) -> tuple[float, int, dict[str, float]]:
    """The Ray runtime's seconds per round (planning included, no evaluation), the peak host memory, and where
    the median round's time went (the driver's planning, its waits for the edge workers' forward, backward and
    adapter sums, and for the server part's steps)."""
    from sflam.actors.runtime import RayBackend

    config = load_config(None, scenario(K, rounds, "ray") + list(extra or []))
    with PeakMemory() as memory:
        runtime = RayBackend(config)
        try:
            engine = runtime.engine()
            adapter = runtime.initial_adapter()
            times: list[float] = []
            phases: list[dict[str, float]] = []
            waits = [(engine, "configure"), (runtime, "_gather"), (runtime, "_await"), (runtime, "_server_call")]
            for r in range(rounds):
                phases.append({})
                for owner, name in waits:
                    timed(owner, name, phases[-1])
                adapter, metrics = engine.run_round(r, adapter)
                for owner, name in waits:
                    delattr(owner, name)  # back to the class's method
                times.append(metrics.wall_s)
        finally:
            runtime.shutdown()
    later = times[1:]  # after the first round (warm-up)
    median = int(np.argsort(later)[len(later) // 2]) + 1
    return float(np.median(later)), memory.peak, phases[median]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--one-step-from", type=int, default=10000)
    parser.add_argument("--ray-rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of the batched and single-adapter paths")
    parser.add_argument("--ray-only", action="store_true",
                        help="only the Ray columns (the local paths' cells read '-'): minutes less at 10,000")
    parser.add_argument("--fleet", action="store_true",
                        help="a three-class fleet at cuts 1/2/3 beside every device at cut 1 and at cut 3 (Ray only)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/ray_scale.md (ray_scale_fleet.md with --fleet)")
    args = parser.parse_args()
    quiet_libraries()
    if args.fleet:
        fleet_table(args.sizes, max(args.ray_rounds, 3), args.out or Path("benchmarks/results/ray_scale_fleet.md"))
        return
    args.out = args.out or Path("benchmarks/results/ray_scale.md")
    lines = ["| devices per round | planning s | batched s | device by device s | device by device / batched | "
             "single adapter s | batched / single adapter | ray s/round | peak host memory, ray (GiB) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    split = ["", "Where the Ray round's time goes (the round above: the driver's wall seconds in each phase):", "",
             "| devices per round | ray s/round | planning s | edge workers s | server part s |",
             "|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for K in args.sizes:
        one_step = K >= args.one_step_from and not args.ray_only
        if args.ray_only:
            local = "| - " * 6
        else:
            t = local_paths(load_config(None, scenario(K, 2, "local")), one_step, 1 if one_step else args.repeats)
            local = (f"| {t['configure']:.2f} | {t['batched']:.2f} | {t['reference']:.2f} | "
                     f"{t['reference'] / t['batched']:.1f} | {t['single']:.2f} | {t['batched'] / t['single']:.2f} ")
        gc.collect()  # the local paths' experiment and buffers are gone before the Ray run is measured
        release_freed_memory()  # (glibc would keep their heap in this process's PSS otherwise)
        ray_s, peak, phases = ray_round(K, args.ray_rounds)
        mark = " (1 local step)" if one_step else ""
        line = f"| {K}{mark} {local}| {ray_s:.2f} | {peak / 2**30:.2f} |"
        lines.append(line)
        split.append(f"| {K} | {ray_s:.2f} | " + " | ".join(f"{phases.get(p, 0.0):.2f}" for p in
                                                         ("planning", "edge workers", "server part")) + " |")
        print(line, flush=True)
    print("\n".join(split), flush=True)
    lines += split
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python benchmarks/ray_scale.py "
               f"--sizes {' '.join(map(str, args.sizes))}{' --ray-only' if args.ray_only else ''} --out {args.out}")
    text = f"Command: {command}\n\n" + "\n".join(lines) + "\n"
    partial = args.out.with_suffix(".md.tmp")
    partial.write_text(text)
    partial.replace(args.out)  # atomic


if __name__ == "__main__":
    main()
