"""One batched computation for many devices equals the device-by-device path (DESIGN §8), for every family
and weight mode: the same smashed data, losses, gradients and adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sflam.platform import codec, cohort, executors
from sflam.platform.data import collate
from sflam.platform.executors import DeviceExecutor, ServerExecutor
from sflam.platform.runtime import build_executors
from sflam.platform.strategies import FitInstructions, weighted_sum
from tests.conftest import tiny_config

FAMILIES = ("tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-vit", "tiny-dinov2")
MODES = ("fp32", "bf16", "int8", "nf4", "fp4")
# four devices: mini-batches of 5, 3 (fewer than the batch size), 5 and 2 samples; the second drops out after one
# of the two local steps (weight 0), the last has its own bits
SIZES, STEPS, BITS = (5, 3, 5, 2), (2, 1, 2, 2), (6, 6, 6, 4)


def parts(model: str, weights: str, *overrides: str) -> tuple[DeviceExecutor, ServerExecutor, list]:
    vision = model in ("tiny-vit", "tiny-dinov2")
    config = tiny_config(f"model.name={model}", f"quant.weights={weights}", "quant.activation_bits=6",
                         "quant.gradient_bits=8", *(("data.dataset=digits",) if vision else ()), *overrides)
    data, device, server = build_executors(config)
    rng = np.random.default_rng(0)
    batches = [[collate(data.train, rng.choice(len(data.train), n, replace=False), data.pad_token_id)
                for _ in range(2)] for n in SIZES]
    return device, server, batches


def one_round(device: DeviceExecutor, server: ServerExecutor, batches: list, fit: FitInstructions, batched: bool
              ) -> tuple[list[torch.Tensor], list[float], dict[str, torch.Tensor]]:
    """A round of two local steps; returns every step's decoded smashed data, the losses and the weighted sum."""
    start = server.checkpoint()
    global_adapter = device.initial_adapter()
    devices = [3, 8, 11, 14]
    weights = [float(n) if s == 2 else 0.0 for n, s in zip(SIZES, STEPS, strict=True)]
    smashed, losses = [], []
    if batched:
        group = device.start_cohort(devices, global_adapter, 0.5, fit)
    else:
        states = [device.start(k, global_adapter, 0.5, fit) for k in devices]
    for step in range(2):
        live = [i for i, s in enumerate(STEPS) if s > step]
        if batched:
            messages = device.forward_cohort(group, live, [batches[i][step] for i in live], 0, step,
                                             [BITS[i] for i in live])
        else:
            messages = [device.forward(states[i], batches[i][step], 0, step, BITS[i]) for i in live]
        smashed += [codec.decode(m.activations) for m in messages]
        result = server.step(messages, 0, step)
        losses.append(result.loss)
        if batched:
            device.backward_cohort(group, step, result.gradients)
        else:
            for i, gradient in zip(live, result.gradients, strict=True):
                device.backward(states[i], step, gradient)
    server.restore(start)
    if batched:
        return smashed, losses, group.weighted_sum(weights)
    kept = [i for i, w in enumerate(weights) if w > 0]
    return smashed, losses, weighted_sum([device.final_adapter(states[i]) for i in kept], [weights[i] for i in kept])


def assert_same(device: DeviceExecutor, server: ServerExecutor, batches: list,
                fit: FitInstructions | None = None) -> dict[str, torch.Tensor]:
    fit = fit or FitInstructions()
    smashed, losses, summed = one_round(device, server, batches, fit, batched=True)
    ref_smashed, ref_losses, ref_summed = one_round(device, server, batches, fit, batched=False)
    assert len(smashed) == len(ref_smashed) == 7
    for a, b in zip(smashed, ref_smashed, strict=True):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-5
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert summed.keys() == ref_summed.keys()
    for name in summed:
        assert float((summed[name] - ref_summed[name]).abs().max()) <= 1e-5, name
    return summed


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("weights", MODES)
def test_batched_devices_equal_the_device_by_device_path(model: str, weights: str) -> None:
    device, server, batches = parts(model, weights)
    summed = assert_same(device, server, batches)
    initial = device.initial_adapter()
    trained = sum(SIZES[i] for i, s in enumerate(STEPS) if s == 2)
    # the devices trained: the average moved away from the global adapter
    assert max(float((summed[n] / trained - initial[n]).abs().max()) for n in initial) > 1e-4


def test_fedprox_and_ffa_lora_instructions_are_applied_per_device() -> None:
    device, server, batches = parts("tiny-llama", "nf4")
    initial = device.initial_adapter()
    trained = sum(SIZES[i] for i, s in enumerate(STEPS) if s == 2)
    prox = assert_same(device, server, batches, FitInstructions(proximal_mu=5.0))
    plain = assert_same(device, server, batches)
    assert max(float((prox[n] - plain[n]).abs().max()) for n in prox) > 1e-6  # the proximal term acts
    frozen = assert_same(device, server, batches, FitInstructions(frozen=("lora_A",)))
    for name, tensor in frozen.items():
        moved = float((tensor / trained - initial[name]).abs().max())
        assert (moved < 1e-6) if "lora_A" in name else (moved > 1e-4), name


def test_devices_in_small_recomputed_chunks_equal_the_device_by_device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cohort, "CHUNK_SAMPLES", 6)  # several stacked batches per sequence length
    monkeypatch.setattr(cohort, "KEEP_GRAPH_SAMPLES", 0)  # the backward recomputes every chunk's forward
    device, server, batches = parts("tiny-gpt2", "bf16")
    assert len(cohort.chunks([0, 1, 2, 3], [b[0] for b in batches])) >= 3
    assert_same(device, server, batches)


def test_a_device_part_without_adapters_runs_batched() -> None:
    device, server, batches = parts("tiny-gpt2", "int8", "split.cut_layer=0")
    assert not device.trains
    assert assert_same(device, server, batches) == {}


def test_the_server_step_in_chunks_equals_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    device, server, batches = parts("tiny-llama", "fp32", "quant.gradient_bits=32")
    group = device.start_cohort([3, 8, 11, 14], device.initial_adapter())
    messages = device.forward_cohort(group, [0, 1, 2, 3], [b[0] for b in batches], 0, 0, [32] * 4)
    start = server.checkpoint()
    whole = server.step(messages, 0, 0)
    whole_state = server.state()
    server.restore(start)
    monkeypatch.setattr(executors, "SERVER_CHUNK_SAMPLES", 6)  # chunks of 6, 6 and 3 samples, by length
    shapes: list[tuple[int, ...]] = []
    hook = server.part.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[1].shape)))
    chunked = server.step(messages, 0, 0)
    hook.remove()
    lengths = sorted(int(n) for m in messages for n in m.attention_mask.sum(1))
    assert shapes == [(6, lengths[5]), (6, lengths[11]), (3, lengths[14])]  # each padded to its own longest
    assert chunked.loss == pytest.approx(whole.loss, abs=1e-6) and chunked.samples == whole.samples == 15
    for a, b in zip(chunked.gradients, whole.gradients, strict=True):
        assert a is not None and b is not None
        expected = codec.decode(b)  # equal up to float rounding (other padding and sums in another order)
        assert float((codec.decode(a) - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
    state = server.state()
    assert max(float((state[n] - whole_state[n]).abs().max()) for n in state) <= 1e-6
