"""Repeating an experiment over seeds: the configs, the mean and 95 % confidence interval of every figure.

A seed moves everything random about a run: the data partition over devices, device placement and
clocks, fading, device selection, LoRA initialisation and the codec's rounding; the train/test split
(data.split_seed) stays, so every seed is evaluated on the same held-out set. Intervals are Student-t
intervals of the mean over seeds; ratios between methods are formed within a seed first (paired).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

from sflam.platform.config import ExperimentConfig, config_from_dict


def seed_configs(config: ExperimentConfig, seeds: int) -> list[ExperimentConfig]:
    """config.seed, config.seed + 1, ...; with several seeds each run's name says its seed."""
    if seeds == 1:
        return [config]
    return [config_from_dict({**config.to_dict(), "seed": config.seed + i,
                              "name": f"{config.name}-seed{config.seed + i}"}) for i in range(seeds)]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95 % Student-t confidence interval (nan with one value)."""
    data = np.asarray(values, dtype=np.float64)
    mean = float(np.mean(data))
    if data.size < 2:
        return mean, float("nan")
    half = float(stats.t.ppf(0.975, data.size - 1) * np.std(data, ddof=1) / math.sqrt(data.size))
    return mean, half


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of means over seeds, with `<key>_ci95` beside every numeric key and `seeds` = how many."""
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [row.get(key) for row in rows]
        numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numeric) == len(values) and numeric and all(math.isfinite(v) for v in numeric):
            out[key], out[f"{key}_ci95"] = mean_ci(numeric)
        else:
            out[key] = values[0] if all(v == values[0] for v in values) else values
    out["seeds"] = len(rows)
    return out


def with_ci(row: dict[str, Any], key: str, spec: str) -> str:
    """`mean ± half` (or the mean alone with one seed)."""
    value, half = row.get(key), row.get(f"{key}_ci95")
    if value is None:
        return "-"
    if half is None or not math.isfinite(half):
        return format(value, spec)
    return f"{format(value, spec)} ± {format(half, spec)}"
