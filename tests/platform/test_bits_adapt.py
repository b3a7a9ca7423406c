"""The default scenario's allocator trades bits against channels (docs/concepts/allocator.md: distortion budget of 6
bits on average)."""

from __future__ import annotations

import numpy as np
import pytest

from sflam.platform.allocation import distortion
from sflam.platform.assembly import Experiment
from sflam.platform.config import load_config
from sflam.platform.participation import round_indices, round_shapes, select_devices


def shapes(exp: Experiment, round_index: int, selected: np.ndarray):  # type: ignore[no-untyped-def]
    return round_shapes(exp.data, round_indices(exp.config, exp.data, round_index, selected))


@pytest.mark.integration
def test_default_scenario_gives_poor_channels_fewer_bits(repo_root) -> None:
    config = load_config(repo_root / "configs" / "default.yaml", ["runtime=local"])
    exp = Experiment.build(config)
    widths: set[int] = set()
    for round_index in range(5):
        selected = select_devices(config.seed, round_index, config.data.num_devices, config.train.devices_per_round)
        plan = exp.planner.plan(round_index, selected, shapes(exp, round_index, selected))
        bits = plan.allocation.bits
        problem = exp.planner.problem(round_index, selected, shapes(exp, round_index, selected))
        assert float(np.sum(problem.distortion_weight * distortion(bits))) <= problem.distortion_budget * (1 + 1e-9)
        order = np.argsort(plan.gain)
        half = len(order) // 2
        assert bits[order[:half]].mean() < bits[order[half:]].mean(), (round_index, bits, plan.gain)
        widths |= set(bits.tolist())
    assert len(widths) >= 2
