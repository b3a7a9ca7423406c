"""Costs measured on the real model: FLOPs, device memory, and the round plan's exact payloads."""

from __future__ import annotations

import numpy as np
import pytest

from sflam.platform.runtime import Experiment, round_batches, run_local, run_round, select_devices
from tests.conftest import tiny_config


def test_device_flops_grow_with_the_cut_and_the_length() -> None:
    tables = {cut: Experiment.build(tiny_config(f"split.cut_layer={cut}")).planner.flops for cut in (1, 2, 4)}
    one, two, four = (tables[c].device(16)[0] for c in (1, 2, 4))
    # the embedding lookup costs no FLOPs: every block adds the same work
    assert two == 2 * one and four == 4 * one
    assert tables[1].device(32)[0] > 2 * tables[1].device(16)[0] * 0.99  # at least linear in length
    assert tables[1].device(16)[1] > 0  # backward through the LoRA adapters
    assert tables[4].server(16)[0] > 0  # final norm and head remain on the server


def test_cut_zero_device_has_no_compute() -> None:
    exp = Experiment.build(tiny_config("split.cut_layer=0"))
    assert exp.planner.flops.device(16) == (0, 0)


def test_plan_payloads_equal_what_the_round_sends() -> None:
    config = tiny_config("quant.activation_bits=8", "quant.gradient_bits=6", "train.rounds=1")
    exp = Experiment.build(config)
    selected = select_devices(config.seed, 0, config.data.num_devices, config.train.devices_per_round)
    problem, _, _, _ = exp.planner.problem(0, selected, round_batches(exp, 0, selected))
    _, metrics = run_round(exp, 0, exp.device.initial_adapter())
    plan = metrics.plan
    idx = np.array([problem.option_index(int(q)) for q in plan.allocation.bits])
    adapter = exp.planner.adapter_bits
    planned_up = problem.uplink_bits[np.arange(problem.size), idx].sum() - problem.size * adapter
    assert planned_up == metrics.uplink_bits
    assert problem.downlink_bits.sum() - problem.size * adapter == metrics.downlink_bits


def test_device_memory_is_measured_and_quantization_shrinks_it() -> None:
    fp32 = Experiment.build(tiny_config("quant.weights=fp32")).memory
    nf4 = Experiment.build(tiny_config("quant.weights=nf4")).memory
    assert nf4.weights < 0.5 * fp32.weights
    assert nf4.adapters == fp32.adapters > 0 and nf4.optimizer == 2 * nf4.adapters
    assert fp32.activations > 0 and nf4.total == nf4.weights + nf4.adapters + nf4.gradients + nf4.optimizer + \
        nf4.activations
    bigger = Experiment.build(tiny_config("quant.weights=fp32", "train.batch_size=16")).memory
    assert bigger.activations == pytest.approx(2 * fp32.activations, rel=0.25)


def test_run_reports_costs_and_the_allocator_beats_equal() -> None:
    sflam = run_local(tiny_config("train.rounds=2", "allocation.lam=0.5"))
    equal = run_local(tiny_config("train.rounds=2", "allocation.policy=equal"))
    summary = sflam.summary()
    for key in ("round_latency_s", "comm_latency_s", "compute_latency_s", "energy_j",
                "energy_efficiency_samples_per_j", "device_memory_bytes"):
        assert summary[key] is not None and summary[key] > 0, key
    for ours, base in zip(sflam.rounds, equal.rounds, strict=True):
        assert ours.objective <= base.objective * (1 + 1e-9)
        assert ours.samples == base.samples
