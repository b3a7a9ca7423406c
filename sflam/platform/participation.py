"""Who takes part in a round, decided on the driver and seeded so every runtime draws the same: availability
(all, a Bernoulli draw or a trace), the K devices, mid-round dropouts, over-selection, each device's mini-batches."""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import numpy as np

from sflam.platform.config import ExperimentConfig
from sflam.platform.data import BatchShape, DataBundle, batch_shape, device_batches


def select_devices(seed: int, round_index: int, num_devices: int, per_round: int) -> np.ndarray:
    """The K devices of a round, seeded by (seed, round) alone."""
    return choose(seed, round_index, np.arange(num_devices), per_round)


def choose(seed: int, round_index: int, pool: np.ndarray, count: int) -> np.ndarray:
    rng = np.random.default_rng([seed, round_index, 7])
    return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))


@lru_cache(maxsize=8)
def read_trace(path: str) -> dict[int, frozenset[int]]:
    """An availability trace: CSV rows `device,round` (0-based) -> the devices available in each round."""
    rounds: dict[int, set[int]] = {}
    with Path(path).open(newline="") as handle:
        for row in csv.DictReader(handle):
            rounds.setdefault(int(row["round"]), set()).add(int(row["device"]))
    return {r: frozenset(d) for r, d in rounds.items()}


def available_devices(config: ExperimentConfig, round_index: int) -> np.ndarray:
    """The devices that can be selected in a round: all, a seeded Bernoulli draw, or the trace's."""
    n, part = config.data.num_devices, config.participation
    if part.trace is not None:
        return np.array(sorted(k for k in read_trace(part.trace).get(round_index, ()) if k < n), dtype=np.int64)
    if part.availability >= 1.0:
        return np.arange(n)
    draw = np.random.default_rng([config.seed, round_index, 11]).random(n)
    return np.flatnonzero(draw < part.availability)


def dropout_steps(config: ExperimentConfig, round_index: int, devices: np.ndarray) -> list[int]:
    """Local steps each device completes: E, or fewer for a device that drops out (seeded per device)."""
    steps, p = config.train.local_steps, config.participation.dropout
    out = []
    for k in devices:
        rng = np.random.default_rng([config.seed, round_index, int(k), 13])
        drops, after = rng.random() < p, int(rng.integers(0, steps))
        out.append(after if drops else steps)
    return out


def keep_first_to_finish(latency_s: np.ndarray, count: int) -> np.ndarray:
    """Positions of the `count` devices that finish first in simulated time (ties: the lower position)."""
    return np.sort(np.argsort(np.asarray(latency_s), kind="stable")[:count])


def round_indices(config: ExperimentConfig, data: DataBundle, round_index: int, devices: np.ndarray
                  ) -> dict[int, list[np.ndarray]]:
    """Every listed device's mini-batches of a round as sample indices (seeded by (seed, round, device) alone)."""
    train = config.train
    return {int(k): device_batches(data.shards[k], train.batch_size, train.local_steps, config.seed, round_index,
                                   int(k)) for k in devices}


def round_shapes(data: DataBundle, indices: dict[int, list[np.ndarray]]) -> dict[int, list[BatchShape]]:
    """The shapes of those mini-batches: what the round's plan needs, without collating them."""
    return {k: [batch_shape(data.train, idx) for idx in steps] for k, steps in indices.items()}
