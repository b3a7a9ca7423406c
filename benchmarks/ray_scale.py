"""Ray runtime against the reference runtime on the same work: wall time per round and peak host memory.

Run: .venv/bin/python benchmarks/ray_scale.py [--sizes 10 100 1000] [--rounds 3]
Work: tiny-llama on the synthetic task, every device selected every round (K devices per round), a few
samples each, 2 local steps of mini-batch 4, nf4 device weights, 8-bit smashed data, torch server engine.
The time per round is the median over rounds after the first (warm-up); both runtimes use both cores
(the local runtime two torch threads, the Ray runtime two edge workers of one thread each).
Peak host memory is the largest sum of proportional set sizes (PSS: shared pages split between the processes
that map them, so shared libraries count once) of this process and every Ray process.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import psutil

from sflam.platform.build import quiet_libraries
from sflam.platform.config import load_config


def scenario(K: int, rounds: int, runtime: str) -> list[str]:
    return ["model.name=tiny-llama", "data.dataset=synthetic", f"data.num_devices={K}",
            f"data.synthetic_samples={max(12 * K, 200)}", f"train.devices_per_round={K}", f"train.rounds={rounds}",
            "train.local_steps=2", "train.batch_size=4", f"train.eval_every={rounds}", "data.eval_samples=256",
            "quant.weights=nf4", f"runtime={runtime}", "ray.workers=2", "allocation.policy=equal"]


class PeakMemory:
    """Samples the memory (PSS) of this process tree and every Ray process."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            procs = [me, *me.children(recursive=True)]
            procs += [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and any(
                "ray" in part for part in p.info["cmdline"][:3]) and p.pid not in {q.pid for q in procs}]
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    quiet_libraries()
    from sflam.actors.runtime import run_ray
    from sflam.platform.runtime import run_local

    print("| devices per round | local s/round | ray s/round | ray / local | peak host memory, ray (GiB) |")
    print("|---:|---:|---:|---:|---:|")
    for K in args.sizes:
        with PeakMemory() as memory:  # first, so the driver holds nothing of the local run
            remote = run_ray(load_config(None, scenario(K, args.rounds, "ray")))
        local = run_local(load_config(None, scenario(K, args.rounds, "local")))
        t_local = float(np.median([r.wall_s for r in local.rounds[1:]]))
        t_ray = float(np.median([r.wall_s for r in remote.rounds[1:]]))
        same = max(float((local.device_adapter[n] - remote.device_adapter[n]).abs().max())
                   for n in local.device_adapter)
        print(f"| {K} | {t_local:.2f} | {t_ray:.2f} | {t_ray / t_local:.2f} | {memory.peak / 2**30:.2f} |"
              f"  <!-- max adapter difference {same:.1e} -->", flush=True)


if __name__ == "__main__":
    main()
