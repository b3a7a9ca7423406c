"""Actors hand the heap a call freed back to the operating system (docs/concepts/ray-runtime.md): measured on a
process's resident memory, and required of every actor call that allocates."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from sflam.actors.edge import EdgeWorker
from sflam.actors.server import ServerRank

# a call that frees 512 MiB of heap in 64 KiB blocks, each followed by a 1 KiB block the caller keeps: the
# freed blocks are holes below the heap's top, which glibc's free() keeps resident and malloc_trim returns
CALL = """
import sys
import psutil
from sflam.actors.memory import trimmed

def call():
    blocks, kept = [], []
    for _ in range(8192):
        blocks.append(bytearray(64 * 1024))
        kept.append(bytearray(1024))
    del blocks
    return kept

rss = lambda: psutil.Process().memory_info().rss / 2**20
before = rss()
kept = (trimmed(call) if sys.argv[1] == "trimmed" else call)()
print(rss() - before)
"""

# calls that only read a few fields: nothing to hand back
GETTERS = {"where", "kernels", "ready", "threads", "rendezvous", "step_threads", "set_lr_factor"}


def _retained_mib(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", CALL, mode], capture_output=True, text=True, check=True,
                          timeout=120)
    return float(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_a_trimmed_call_hands_the_freed_heap_back() -> None:
    plain, trimmed = _retained_mib("plain"), _retained_mib("trimmed")
    assert plain > 400, f"the untrimmed call should keep most of its 512 MiB resident, kept {plain:.0f} MiB"
    # what stays: the 8 MiB of kept blocks and the pages they share with the holes (at most 4 KiB each)
    assert trimmed < 8 + 8192 * 4 / 1024 + 8, f"the trimmed call kept {trimmed:.0f} MiB of the 512 it freed"


@pytest.mark.parametrize("actor", [EdgeWorker, ServerRank])
def test_every_actor_call_that_allocates_releases_the_heap(actor: type) -> None:
    calls = {name for name, member in inspect.getmembers(actor, inspect.isfunction) if not name.startswith("_")}
    assert calls - GETTERS, "no actor calls found"
    untrimmed = sorted(name for name in calls - GETTERS if not getattr(getattr(actor, name), "releases_heap", False))
    assert not untrimmed, f"{actor.__name__} calls that keep their freed heap: {untrimmed}"
