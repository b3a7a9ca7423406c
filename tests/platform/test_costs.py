"""Costs measured on the real model: FLOPs in every weight mode, measured peak memory, the round plan."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sflam.platform import server as server_module
from sflam.platform.assembly import Experiment, build_runners
from sflam.platform.data import batch_shape, collate
from sflam.platform.flops import FlopTable, _count
from sflam.platform.local import run_local, run_round
from sflam.platform.memory import measure_device_memory
from sflam.platform.participation import round_indices, round_shapes, select_devices
from sflam.platform.schedule import latency, lockstep_phases
from tests.conftest import tiny_config

MODES = ("bf16", "int8", "nf4", "fp4")


def shapes(exp: Experiment, selected):  # type: ignore[no-untyped-def]
    """The first round's mini-batch shapes of the selected devices."""
    return round_shapes(exp.data, round_indices(exp.config, exp.data, 0, selected))


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


def _device_flops(model: str, mode: str) -> tuple[int, int]:
    vision = model in ("tiny-vit", "tiny-dinov2")
    extra = ["data.dataset=digits"] if vision else []
    data, device, server = build_runners(tiny_config(f"model.name={model}", f"quant.weights={mode}",
                                                       "split.cut_layer=2", *extra))
    table = FlopTable(device.part, server.part, device.initial_adapter(), int(device.part.config.hidden_size))
    if vision:  # one real image batch: pixels in, patch tokens out
        return table.device_batch(batch_shape(data.train, np.arange(4)))
    return table.device(16)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-vit", "tiny-dinov2"])
def test_quantized_device_parts_count_the_same_flops_as_fp32(model: str) -> None:
    """bitsandbytes' 4-bit matmul is invisible to FlopCounterMode: the quantized layers are counted explicitly,
    so every weight mode does the fp32 math (dequantization itself is not counted)."""
    fwd, bwd = _device_flops(model, "fp32")
    assert fwd > 0 and bwd > 0
    for mode in MODES:
        q_fwd, q_bwd = _device_flops(model, mode)
        assert q_fwd == pytest.approx(fwd, rel=0.01), mode
        assert q_bwd == pytest.approx(bwd, rel=0.01), mode


def test_plan_payloads_equal_what_the_round_sends() -> None:
    config = tiny_config("quant.activation_bits=8", "quant.gradient_bits=6", "train.rounds=1")
    exp = Experiment.build(config)
    selected = select_devices(config.seed, 0, config.data.num_devices, config.train.devices_per_round)
    problem = exp.planner.problem(0, selected, shapes(exp, selected))
    _, metrics = run_round(exp, 0, exp.device.initial_adapter())
    plan = metrics.plan
    idx = np.array([problem.option_index(int(q)) for q in plan.allocation.bits])
    E = config.train.local_steps
    # stages 0..E-1 carry the smashed data of steps 1..E up; stages 1..E the gradients of steps 1..E down
    assert problem.stage_uplink(idx)[:, :E].sum() == metrics.uplink_bits
    assert problem.downlink_bits[:, 1:].sum() == metrics.downlink_bits
    assert np.all(problem.stage_uplink(idx)[:, E] == exp.planner.adapter_bits)  # the adapter goes up last
    assert np.all(problem.downlink_bits[:, 0] == exp.planner.adapter_bits)


def lockstep_by_hand(up: np.ndarray, down: np.ndarray, forward: np.ndarray, backward: np.ndarray,
                     server: np.ndarray) -> float:
    """A lockstep round written out: stage 0 downloads the adapter, runs forward 1 and sends it; stage e receives
    gradient e, runs backward e and forward e + 1 and sends it; the last stage runs the last backward and sends the
    adapter. Every stage but the last ends at a barrier (the slowest device), then the server's step."""
    E = forward.shape[1]
    busy = [down[:, 0] + forward[:, 0] + up[:, 0]]
    busy += [down[:, e] + backward[:, e - 1] + forward[:, e] + up[:, e] for e in range(1, E)]
    busy += [down[:, E] + backward[:, E - 1] + up[:, E]]
    return float(sum(np.max(b) for b in busy) + np.sum(server))


def test_lockstep_latency_of_a_hand_made_plan() -> None:
    """Two devices, two steps, times in seconds. Stages (A | B): 1+2+1 | 2+1+2 -> 5; 1+3+1+1 | 1+1+1+3 -> 6;
    2+1+2 | 1+1+1 -> 5; server 0.5 + 0.5: 17 s. Without the radio: 2 | 1; 3+1 | 1+1; 1 | 1 -> 2 + 4 + 1 + 1 = 8 s;
    the radio adds 9 s."""
    phases = lockstep_phases(uplink_s=np.array([[1.0, 1.0, 2.0], [2.0, 3.0, 1.0]]),
                             downlink_s=np.array([[1.0, 1.0, 2.0], [2.0, 1.0, 1.0]]),
                             forward_s=np.array([[2.0, 1.0], [1.0, 1.0]]),
                             backward_s=np.array([[3.0, 1.0], [1.0, 1.0]]),
                             server_s=np.array([0.5, 0.5]))
    parts = latency(phases, "lockstep")
    assert (parts.round_s, parts.compute_s, parts.comm_s) == pytest.approx((17.0, 8.0, 9.0), rel=1e-15)


def test_round_latency_and_its_parts_are_the_planned_lockstep() -> None:
    config = tiny_config("train.rounds=1", "train.local_steps=3")
    exp = Experiment.build(config)
    _, metrics = run_round(exp, 0, exp.device.initial_adapter())
    plan = metrics.plan
    a = plan.allocation
    work = exp.planner.inputs(0, plan.devices, shapes(exp, plan.devices))  # the compute phases, from the batches
    zeros = np.zeros_like(a.uplink_s)
    total = lockstep_by_hand(a.uplink_s, a.downlink_s, work.forward_s, work.backward_s, work.server_s)
    compute = lockstep_by_hand(zeros, zeros, work.forward_s, work.backward_s, work.server_s)
    assert metrics.round_latency_s == pytest.approx(total, rel=1e-12)
    assert metrics.round_latency_s == pytest.approx(a.round_latency_s, rel=1e-9)  # what the allocator planned
    assert metrics.compute_latency_s == pytest.approx(compute, rel=1e-12)
    assert metrics.comm_latency_s == pytest.approx(total - compute, rel=1e-9)
    assert 0 < metrics.comm_latency_s < metrics.round_latency_s
    # lockstep: never faster than the slowest device alone, never slower than all barriers at their worst
    assert metrics.round_latency_s >= float(np.max(plan.phases.chains())) * (1 - 1e-12)


@pytest.mark.parametrize("chunk", [6, 2048])  # several chunks in order of length, and one batch
def test_the_plan_charges_the_server_flops_its_steps_run(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "SERVER_CHUNK_SAMPLES", chunk)
    config = tiny_config("train.rounds=1", "quant.weights=nf4", "quant.activation_bits=8")
    exp = Experiment.build(config)
    selected = select_devices(config.seed, 0, config.data.num_devices, config.train.devices_per_round)
    charged = exp.planner.inputs(0, selected, shapes(exp, selected)).server_s * config.system.server_flops
    ran: list[int] = []
    step = exp.server.step

    def counted(*args):  # the FLOPs of each server step as it runs
        out = []
        ran.append(_count(lambda: out.append(step(*args)), exp.server.part))
        return out[0]

    exp.server.step = counted
    run_round(exp, 0, exp.device.initial_adapter())
    assert len(ran) == config.train.local_steps == len(charged)
    assert ran == [round(float(f)) for f in charged]


class LiveStorages(TorchDispatchMode):
    """Independent memory measurement: the bytes of every storage an op creates, until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:  # a new allocation, not a view
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out


def test_device_memory_is_the_measured_peak_of_a_training_step() -> None:
    config = tiny_config("quant.weights=fp32", "train.batch_size=16", "model.max_length=64")
    data, device, _ = build_runners(config)
    adapter = device.initial_adapter()
    longest = np.argsort([-len(s) for s in data.train.input_ids])[:16]
    batch = collate(data.train, longest, data.pad_token_id)
    memory = measure_device_memory(device.part, adapter, batch)
    assert memory.gradients == memory.adapters > 0 and memory.optimizer >= 2 * memory.adapters
    assert memory.peak >= memory.weights + memory.adapters + memory.gradients + memory.optimizer
    assert memory.total == memory.peak
    assert memory.weights + memory.adapters + memory.gradients + memory.optimizer + memory.activations <= memory.peak

    # the same step measured independently (storages created by every aten op)
    live = {n: t.detach().clone().requires_grad_(True) for n, t in adapter.items()}
    optimizer = torch.optim.AdamW(live.values(), lr=1e-3, weight_decay=0.0)
    with LiveStorages() as tracker:
        out = torch.func.functional_call(device.part, live, (batch.input_ids, batch.attention_mask), strict=False)
        out.backward(torch.ones_like(out))
        optimizer.step()
    resident = memory.weights + memory.adapters + batch.input_ids.nbytes + batch.attention_mask.nbytes
    assert memory.peak == pytest.approx(resident + tracker.peak, rel=0.10)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_device_memory_counts_what_bitsandbytes_allocates(mode: str) -> None:
    fp32 = Experiment.build(tiny_config("quant.weights=fp32")).memory
    quantized = Experiment.build(tiny_config(f"quant.weights={mode}")).memory
    assert quantized.weights < 0.6 * fp32.weights
    assert quantized.peak < fp32.peak
    # dequantized weights and bitsandbytes' buffers live during the step: more than the activations alone
    assert quantized.activations > 0
    assert quantized.peak >= quantized.weights + quantized.adapters + quantized.gradients + quantized.optimizer


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


def test_a_device_that_drops_out_is_priced_for_what_it_did() -> None:
    """Listed with fewer batches than local steps, a device computes and sends only those and no adapter."""
    config = tiny_config("train.rounds=1", "train.local_steps=3", "allocation.policy=equal")
    exp = Experiment.build(config)
    selected = select_devices(config.seed, 0, config.data.num_devices, config.train.devices_per_round)
    batches = shapes(exp, selected)
    full = exp.planner.plan(0, selected, batches)
    dropped = int(selected[1])
    short = exp.planner.plan(0, selected, {**batches, dropped: batches[dropped][:1]})
    phases, whole = short.phases, full.phases
    assert phases.forward[1, 0] == whole.forward[1, 0] and np.all(phases.forward[1, 1:] == 0)
    assert np.all(phases.uplink[1, 1:] == 0) and np.all(phases.downlink[1, 1:] == 0)
    assert phases.adapter_up[1] == 0 and whole.adapter_up[1] > 0
    assert phases.adapter_down[1] == whole.adapter_down[1]  # it did download the global adapter
    assert short.allocation.energy_j[1] < full.allocation.energy_j[1]
    assert short.samples[1] == batches[dropped][0].samples < full.samples[1]
    np.testing.assert_array_equal(short.allocation.energy_j[[0, 2, 3]], full.allocation.energy_j[[0, 2, 3]])


def simulate_u_shaped(phases, E: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A U-shaped round event by event, in its own terms: a device's bottom forward and smashed data up; the
    server's forward once every device's smashed data is in; features down, the head on the device, the
    features' gradient up; the server's backward once every gradient is in; the smashed data's gradient down and
    the bottom backward; the adapter up at the end. (The planner's phases are half steps: 2e and 2e + 1.)"""
    K = phases.adapter_down.shape[0]
    ready = phases.adapter_down.copy()  # when each device can start its next phase
    for e in range(E):
        arrive = ready + phases.forward[:, 2 * e] + phases.uplink[:, 2 * e]
        served = float(arrive.max()) + float(phases.server[2 * e])          # the server's forward of step e
        grads_in = served + phases.downlink[:, 2 * e] + phases.backward[:, 2 * e] + phases.uplink[:, 2 * e + 1]
        assert np.all(phases.forward[:, 2 * e + 1] == 0)
        back = float(grads_in.max()) + float(phases.server[2 * e + 1])      # the server's backward of step e
        ready = back + phases.downlink[:, 2 * e + 1] + phases.backward[:, 2 * e + 1]
    assert ready.shape == (K,)
    return ready + phases.adapter_up


def test_a_u_shaped_round_charges_its_four_transmissions_and_two_barriers() -> None:
    config = tiny_config("quant.activation_bits=8", "quant.gradient_bits=6", "train.rounds=1", "split.head=device",
                         "train.local_steps=3", "model.name=tiny-bert")
    exp = Experiment.build(config)
    selected = select_devices(config.seed, 0, config.data.num_devices, config.train.devices_per_round)
    problem = exp.planner.problem(0, selected, shapes(exp, selected))
    _, metrics = run_round(exp, 0, exp.device.initial_adapter())
    plan, E = metrics.plan, config.train.local_steps
    assert problem.stages == 2 * E + 1 and plan.phases.forward.shape == (len(selected), 2 * E)
    idx = np.array([problem.option_index(int(q)) for q in plan.allocation.bits])
    # up: smashed data and the features' gradient of every step; down: the features and the smashed data's gradient
    assert problem.stage_uplink(idx)[:, :2 * E].sum() == metrics.uplink_bits
    assert problem.downlink_bits[:, 1:].sum() == metrics.downlink_bits
    assert np.all(problem.stage_uplink(idx)[:, 2 * E] == exp.planner.adapter_bits)
    assert np.all(plan.phases.uplink[:, 1::2] > 0) and np.all(plan.phases.downlink[:, 0::2] > 0)
    finish = simulate_u_shaped(plan.phases, E)
    assert metrics.round_latency_s == pytest.approx(float(finish.max()), rel=1e-12)
    assert metrics.round_latency_s == pytest.approx(plan.allocation.round_latency_s, rel=1e-9)


RANKED = ("lora.rank_policy=by-class", "devices.classes=["
          "{name: small, share: 0.5, memory_mib: 64, clock_hz: [1e9, 1e9], lora_rank: 2},"
          "{name: mid, share: 0.3, memory_mib: 128, clock_hz: [1e9, 1e9], lora_rank: 4},"
          "{name: large, share: 0.2, memory_mib: 256, clock_hz: [1e9, 1e9], lora_rank: 8}]")


def test_flops_payload_and_memory_are_measured_at_each_class_rank() -> None:
    """The real device part with LoRA factors cut to rank r: every LoRA layer's two matmuls cost 2 T (in + out) r
    FLOPs forward for T tokens, so the forward at rank 8 is (8 - 4) x that sum above rank 4's, and rank 8's is the
    global adapter's; the payload at rank r is 32 bits x (r x sum of (in + out)); a peak is measured per rank,
    rank 8's the global adapter's. Seen failing with the FLOPs counted on the uncut adapter."""
    exp = Experiment.build(tiny_config(*RANKED))
    table, planner = exp.planner.flops, exp.planner
    adapter = exp.device.initial_adapter()
    widths = sum(t.shape[1] if ".lora_A." in n else t.shape[0] for n, t in adapter.items())  # sum of (in + out)
    assert widths > 0 and all(".lora_" in n for n in adapter)
    assert planner.rank_bits == {r: 32 * r * widths for r in (2, 4, 8)}
    assert planner.adapter_bits == planner.rank_bits[8]
    shape = batch_shape(exp.data.train, np.arange(1))
    tokens = int(shape.padded)
    forward = {r: table.device_batch(shape, r)[0] for r in (2, 4, 8)}
    backward = {r: table.device_batch(shape, r)[1] for r in (2, 4, 8)}
    assert forward[8] == table.device_batch(shape)[0] and backward[8] == table.device_batch(shape)[1]
    assert forward[8] - forward[4] == 2 * tokens * widths * 4
    assert forward[4] - forward[2] == 2 * tokens * widths * 2
    assert backward[2] < backward[4] < backward[8]
    assert backward[8] - backward[4] == 2 * (backward[4] - backward[2])  # linear in the rank
    assert sorted(planner.memory_by_rank) == [2, 4, 8] and planner.memory_by_rank[8] == exp.memory.total
