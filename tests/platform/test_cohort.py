"""One batched computation for many devices equals the device-by-device path (docs/concepts/ray-runtime.md), for
every family
and weight mode: the same smashed data, losses, gradients and adapters."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from sflam.platform import codec, cohort
from sflam.platform import server as server_module
from sflam.platform.assembly import build_runners
from sflam.platform.data import Batch, collate
from sflam.platform.device import DeviceRunner
from sflam.platform.messages import Smashed
from sflam.platform.server import ServerRunner
from sflam.platform.strategies import FitInstructions, local_step, truncated, weighted_sum, zero_padded
from tests import reference
from tests.conftest import tiny_config
from tests.equality import adamw_reach, assert_adamw_close, assert_determined, assert_same_message, rounding_noise

pytestmark = pytest.mark.equality

FAMILIES = ("tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-vit", "tiny-dinov2")
MODES = ("fp32", "bf16", "int8", "nf4", "fp4")
# four devices: mini-batches of 5, 3 (fewer than the batch size), 5 and 2 samples; the second drops out after one
# of the two local steps (weight 0), the last has its own bits
SIZES, STEPS, BITS = (5, 3, 5, 2), (2, 1, 2, 2), (6, 6, 6, 4)
RANKS = (2, 8, 4, 8)  # with lora.rank_policy=by-class: the devices' LoRA ranks, the global adapter's 8


def parts(model: str, weights: str, *overrides: str) -> tuple[DeviceRunner, ServerRunner, list]:
    vision = model in ("tiny-vit", "tiny-dinov2")
    config = tiny_config(f"model.name={model}", f"quant.weights={weights}", "quant.activation_bits=6",
                         "quant.gradient_bits=8", *(("data.dataset=digits",) if vision else ()), *overrides)
    data, device, server = build_runners(config)
    rng = np.random.default_rng(0)
    batches = [[collate(data.train, rng.choice(len(data.train), n, replace=False), data.pad_token_id)
                for _ in range(2)] for n in SIZES]
    return device, server, batches


@dataclass
class Trace:
    """What one path did in a round: each step's messages up, the gradients it received, its adapters' gradients
    before each optimizer step (by position in the round), and the weighted sum of the finished devices."""

    messages: list[list[Smashed]] = field(default_factory=list)
    received: list[list] = field(default_factory=list)
    gradients: list[dict[int, dict[str, torch.Tensor]]] = field(default_factory=list)
    summed: dict[str, torch.Tensor] = field(default_factory=dict)


def one_round(device: DeviceRunner, server: ServerRunner, batches: list, fit: FitInstructions, batched: bool,
              replay: Trace | None = None, monkeypatch: pytest.MonkeyPatch | None = None,
              ranks: dict[int, DeviceRunner] | None = None) -> Trace:
    """A round of two local steps. The reference (device by device) runs against the server part; the batched
    path receives the reference's gradients (`replay`), so both paths' inputs agree up to rounding at every
    step and a flip of the codec's rounding in one step cannot carry over into the next (tests/equality.py).

    `ranks`: the devices' LoRA ranks (RANKS), each with a runner whose part peft built at that rank; the reference
    runs each device alone through its rank's part from the global adapter cut to its rank, and reports its
    gradients and adapter zero-padded to the global rank."""
    assert monkeypatch is not None
    trace = Trace()
    start = server.checkpoint()
    global_adapter = device.initial_adapter()
    runners = [ranks[r] for r in RANKS] if ranks else [device] * len(SIZES)
    top = max(RANKS)
    devices = [3, 8, 11, 14]
    weights = [float(n) if s == 2 else 0.0 for n, s in zip(SIZES, STEPS, strict=True)]
    recorded: list[dict[str, torch.Tensor]] = []

    def record(adapter, optimizer, anchor, mu) -> None:  # type: ignore[no-untyped-def]
        """The gradients as the optimizer steps on them (FedProx's term included)."""
        step = optimizer.step

        def recording_step(*args, **kwargs):  # type: ignore[no-untyped-def]
            recorded.append({n: t.grad.detach().clone() for n, t in adapter.items() if t.grad is not None})
            return step(*args, **kwargs)

        optimizer.step = recording_step
        try:
            local_step(adapter, optimizer, anchor, mu)
        finally:
            del optimizer.step

    monkeypatch.setattr(cohort, "local_step", record)
    monkeypatch.setattr(reference, "local_step", record)
    if batched:
        group = device.start(devices, global_adapter, 0.5, fit, list(RANKS) if ranks else None)
    else:
        states = [reference.start(runner, k, truncated(global_adapter, r) if ranks else global_adapter, 0.5, fit)
                  for runner, k, r in zip(runners, devices, RANKS, strict=True)]
    for step in range(2):
        live = [i for i, s in enumerate(STEPS) if s > step]
        recorded.clear()
        if batched:
            messages = device.forward(group, live, [batches[i][step] for i in live], 0, step,
                                             [BITS[i] for i in live])
        else:
            messages = [reference.forward(runners[i], states[i], batches[i][step], 0, step, BITS[i]) for i in live]
        gradients = replay.received[step] if replay is not None else server.step(messages, 0, step).gradients
        if batched:
            device.backward(group, step, gradients)
            by_position = {i: {n: g[i] for n, g in recorded[0].items()} for i in live} if recorded else {}
        else:
            for i, gradient in zip(live, gradients, strict=True):
                reference.backward(states[i], step, gradient)
            by_position = dict(zip(live, recorded, strict=True)) if recorded else {}
            if ranks:
                by_position = {i: zero_padded(g, top) for i, g in by_position.items()}
        trace.messages.append(messages)
        trace.received.append(list(gradients))
        trace.gradients.append(by_position)
    server.restore(start)
    kept = [i for i, w in enumerate(weights) if w > 0]
    finals = [reference.final_adapter(states[i]) for i in kept] if not batched else []
    trace.summed = (group.weighted_sum(weights) if batched else
                    weighted_sum([zero_padded(a, top) for a in finals] if ranks else finals,
                                 [weights[i] for i in kept]))
    return trace


def assert_same(device: DeviceRunner, server: ServerRunner, batches: list, monkeypatch: pytest.MonkeyPatch,
                fit: FitInstructions | None = None, host: Callable[[], ContextManager] = contextlib.nullcontext,
                ranks: dict[int, DeviceRunner] | None = None) -> dict[str, torch.Tensor]:
    """The batched path (run within `host`) against the device-by-device reference, with the tolerances of
    tests/equality.py."""
    fit = fit or FitInstructions()
    reference = one_round(device, server, batches, fit, False, monkeypatch=monkeypatch, ranks=ranks)
    with host():
        ours = one_round(device, server, batches, fit, True, replay=reference, monkeypatch=monkeypatch, ranks=ranks)
    assert [len(m) for m in ours.messages] == [len(m) for m in reference.messages] == [4, 3]
    for step, (mine, theirs) in enumerate(zip(ours.messages, reference.messages, strict=True)):
        for a, b in zip(mine, theirs, strict=True):
            assert a.device == b.device
            assert_same_message(a.activations, b.activations, f"step {step + 1} device {a.device} smashed data")
    for step, (mine_grads, their_grads) in enumerate(zip(ours.gradients, reference.gradients, strict=True)):
        assert mine_grads.keys() == their_grads.keys()
        for i in their_grads:
            assert mine_grads[i].keys() == their_grads[i].keys()
            for name in their_grads[i]:
                assert_determined(mine_grads[i][name], their_grads[i][name], f"step {step + 1} position {i} {name}")
    # inputs equal to rounding at every step: the adapters after two AdamW steps (lr x factor 0.5), summed with
    # the weights of the devices that finished
    trained = sum(SIZES[i] for i, s in enumerate(STEPS) if s == 2)
    lr = device.lr * 0.5
    if reference.summed:
        assert_adamw_close(ours.summed, reference.summed, trained * adamw_reach(lr, 2), what="summed adapters")
    else:
        assert ours.summed == {}
    return ours.summed


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("weights", MODES)
def test_batched_devices_equal_the_device_by_device_path(model: str, weights: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    device, server, batches = parts(model, weights)
    summed = assert_same(device, server, batches, monkeypatch)
    initial = device.initial_adapter()
    trained = sum(SIZES[i] for i, s in enumerate(STEPS) if s == 2)
    # the devices trained: the average moved away from the global adapter
    assert max(float((summed[n] / trained - initial[n]).abs().max()) for n in initial) > 1e-4


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-vit"])
@pytest.mark.parametrize("weights", ["fp32", "nf4"])
def test_the_comparison_holds_under_another_hosts_rounding_and_fails_on_a_real_error(
        model: str, weights: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tolerances are wide enough for another CPU's kernels (rounding noise of 8 and 32 units in the last
    place in the batched path: `rounding_noise`) and narrow enough for a LoRA scaling off by one part in a thousand."""
    device, server, batches = parts(model, weights)
    assert_same(device, server, batches, monkeypatch, host=rounding_noise)
    assert_same(device, server, batches, monkeypatch, host=functools.partial(rounding_noise, 2.0**-18, 2.0**-28))
    lora_forward = cohort._lora_forward

    def off_by_a_thousandth(module, *args, **kwargs):  # type: ignore[no-untyped-def]
        scaling = dict(module.scaling)
        module.scaling[cohort.LORA] = scaling[cohort.LORA] * 1.001
        try:
            return lora_forward(module, *args, **kwargs)
        finally:
            module.scaling.update(scaling)

    monkeypatch.setattr(cohort, "_lora_forward", off_by_a_thousandth)
    with pytest.raises(AssertionError):
        assert_same(device, server, batches, monkeypatch)


def test_fedprox_and_ffa_lora_instructions_are_applied_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    device, server, batches = parts("tiny-llama", "nf4")
    initial = device.initial_adapter()
    trained = sum(SIZES[i] for i, s in enumerate(STEPS) if s == 2)
    prox = assert_same(device, server, batches, monkeypatch, FitInstructions(proximal_mu=5.0))
    plain = assert_same(device, server, batches, monkeypatch)
    assert max(float((prox[n] - plain[n]).abs().max()) for n in prox) > 1e-6  # the proximal term acts
    frozen = assert_same(device, server, batches, monkeypatch, FitInstructions(frozen=("lora_A",)))
    for name, tensor in frozen.items():
        moved = float((tensor / trained - initial[name]).abs().max())
        assert (moved < 1e-6) if "lora_A" in name else (moved > 1e-4), name


def test_devices_in_small_recomputed_chunks_equal_the_device_by_device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cohort, "CHUNK_SAMPLES", 6)  # several stacked batches per sequence length
    monkeypatch.setattr(cohort, "KEEP_GRAPH_SAMPLES", 0)  # the backward recomputes every chunk's forward
    device, server, batches = parts("tiny-gpt2", "bf16")
    assert len(cohort.chunks([0, 1, 2, 3], [b[0] for b in batches])) >= 3
    assert_same(device, server, batches, monkeypatch)


def test_a_device_part_without_adapters_runs_batched(monkeypatch: pytest.MonkeyPatch) -> None:
    device, server, batches = parts("tiny-gpt2", "int8", "split.cut_layer=0")
    assert not device.trains
    assert assert_same(device, server, batches, monkeypatch) == {}


def test_the_server_step_in_chunks_equals_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    device, server, batches = parts("tiny-llama", "fp32", "quant.gradient_bits=32")
    group = device.start([3, 8, 11, 14], device.initial_adapter())
    messages = device.forward(group, [0, 1, 2, 3], [b[0] for b in batches], 0, 0, [32] * 4)
    start = server.checkpoint()
    whole = server.step(messages, 0, 0)
    whole_state = server.state()
    server.restore(start)
    monkeypatch.setattr(server_module, "SERVER_CHUNK_SAMPLES", 6)  # chunks of 6, 6 and 3 samples, by length
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


# --------------------------------------------------------------------------- cases the mutation score found untested
# (benchmarks/mutation.py; each test names the mutants it was seen to kill)


def _batch(samples: int, length: int) -> Batch:
    return Batch(torch.ones(samples, length, dtype=torch.long), torch.ones(samples, length, dtype=torch.long),
                 torch.zeros(samples, dtype=torch.long))


def test_chunks_group_devices_by_length_up_to_the_sample_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four devices of 3 samples of length 4 and two of 2 and 3 samples of length 5, at most 6 samples a chunk:
    by hand the chunks are devices (0, 1), (2, 3) and (4, 5); the last one's view pads the 2-sample device to 3
    rows. Kills cohort.chunks 25 (the running sample count)."""
    monkeypatch.setattr(cohort, "CHUNK_SAMPLES", 6)
    batches = [_batch(3, 4), _batch(3, 4), _batch(3, 4), _batch(3, 4), _batch(2, 5), _batch(3, 5)]
    live = [0, 2, 3, 5, 7, 9]
    work = cohort.chunks(live, batches)
    assert [members for members, *_ in work] == [[0, 1], [2, 3], [4, 5]]
    assert [tuple(ids.shape) for _, ids, _, _ in work] == [(6, 4), (6, 4), (5, 5)]
    assert [where.live.tolist() for *_, where in work] == [[0, 2], [3, 5], [7, 9]]
    assert [where.samples for *_, where in work] == [[3, 3], [3, 3], [2, 3]]
    assert work[0][3].index is None  # equal devices: no padding rows
    where = work[2][3]
    assert where.index is not None and where.index.tolist() == [0, 1, 3, 4, 5]  # rows 0-1, then 3-5 of (2 x 3)
    x = torch.arange(1.0, 6.0).reshape(5, 1)
    rows = where.to_devices(x)
    assert rows.shape == (2, 3, 1) and rows[..., 0].tolist() == [[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]]
    assert torch.equal(where.from_devices(rows * 10, x), x * 10)


def test_a_step_without_activation_gradients_still_applies_fedprox() -> None:
    """No gradient comes back (all None) but the adapters have gradients (a U-shaped split's head): the step is
    AdamW on the gradient plus FedProx's mu (w - w_global). By hand: gradient 0.25, w - w_global = -1, mu = 0.5, so
    the step's gradient is -0.25 and AdamW's first step moves w up by lr (|g| / (|g| + 1e-8)); without the
    proximal term it would move down. Kills cohort.backward 15 (mu dropped on this path) and cohort.start 30 (the
    anchor kept only for mu > 1)."""
    global_adapter = {"w": torch.zeros(3)}
    group = cohort.start(torch.nn.Identity(), [0, 1], global_adapter, lr=0.1, proximal_mu=0.5, frozen=[])
    with torch.no_grad():
        group.adapter["w"] -= 1.0
    group.adapter["w"].grad = torch.full((2, 3), 0.25)
    group.pending[0] = []
    cohort.backward(torch.nn.Identity(), group, 0, [None, None])
    expected = -1.0 + 0.1 * 0.25 / (0.25 + 1e-8)
    assert torch.allclose(group.adapter["w"].detach(), torch.full((2, 3), expected), rtol=0, atol=1e-7)


def test_the_cohorts_weighted_sum_and_one_devices_adapter() -> None:
    """By hand in float64: weights 0.1, 0 and 0.7 over three devices' adapters 1, 2 and 3 (times a row) give
    0.1 * 1 + 0.7 * 3 = 2.2 times the row, the device of weight 0 left out; adapter_of(2) is device 2's copy.
    Kills Cohort.weighted_sum 12 (weights in float32: 0.1 is then 0.10000000149) and Cohort.adapter_of 1."""
    row = torch.tensor([1.0, -2.0, 0.5])
    group = cohort.start(torch.nn.Identity(), [4, 5, 6], {"w": row}, lr=0.1, proximal_mu=0.0, frozen=[])
    with torch.no_grad():
        group.adapter["w"] *= torch.tensor([[1.0], [2.0], [3.0]])
    summed = group.weighted_sum([0.1, 0.0, 0.7])
    assert summed["w"].dtype == torch.float64
    expected = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * (0.1 * 1 + 0.7 * 3)
    assert torch.allclose(summed["w"], expected, rtol=1e-15, atol=0)
    own = group.adapter_of(2)
    assert own.keys() == {"w"} and torch.equal(own["w"], 3 * row) and not own["w"].requires_grad


class _TinyPart(torch.nn.Module):
    """A device part small enough to differentiate by hand: a frozen embedding, then one LoRA linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(11, 4)
        self.proj = torch.nn.Linear(4, 3)
        self.embed.requires_grad_(False)
        self.proj.requires_grad_(False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))

    def input_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


@pytest.mark.parametrize(("clip", "nopeek"), [(1.5, 0.7), (0.5, 0.0), (0.0, 0.7)])
def test_the_defended_backward_is_each_devices_clipped_and_nopeek_loss(clip: float, nopeek: float,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Clipping and NoPeek in the batched backward: each device's adapter gradient is that of its own loss,
    <clip(h), g> + w dCor(inputs, h) over its real tokens, written here with the LoRA layer spelled out (W x +
    s B A x) and the clipping by hand (each sample scaled to norm <= C). Two devices of 2 and 3 right-padded
    samples with their own adapters; each defence alone too, the clipping below 1. Kills cohort.backward 55 and 58
    (the chunk's mask and received gradient), 49 and 51 (the defences' thresholds) and cohort._defended_backward 28
    (the NoPeek term)."""
    from peft import LoraConfig, inject_adapter_in_model

    from sflam.privacy.defences import nopeek_loss

    part = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], lora_dropout=0.0),
                                   _TinyPart())
    names = {p: f"proj.lora_{p}.{cohort.LORA}.weight" for p in "AB"}
    generator = torch.Generator().manual_seed(1)
    global_adapter = {names["A"]: torch.randn(2, 4, generator=generator),
                      names["B"]: torch.randn(3, 2, generator=generator)}
    group = cohort.start(part, [0, 1], global_adapter, lr=0.01, proximal_mu=0.0, frozen=[])
    with torch.no_grad():  # the devices' adapters differ
        group.adapter[names["B"]][1] *= -0.5
    group.clip_norm, group.nopeek_weight = clip, nopeek
    masks = [torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])]
    batches = [Batch(torch.randint(0, 11, m.shape, generator=generator) * m, m, torch.zeros(len(m), dtype=torch.long))
               for m in masks]
    cohort.forward(part, group, [0, 1], batches, 0)
    received = [torch.randn(int(m.sum()), 3, generator=generator) for m in masks]
    captured: dict[str, torch.Tensor] = {}

    def capture(adapter, optimizer, anchor, mu) -> None:  # type: ignore[no-untyped-def]
        captured.update({n: t.grad.detach().clone() for n, t in adapter.items()})

    monkeypatch.setattr(cohort, "local_step", capture)
    cohort.backward(part, group, 0, [codec.encode(g, 32) for g in received])
    for k, (batch, g) in enumerate(zip(batches, received, strict=True)):
        a = global_adapter[names["A"]].clone().requires_grad_()
        b = (global_adapter[names["B"]] * (1.0 if k == 0 else -0.5)).requires_grad_()
        x = part.embed(batch.input_ids)
        h = part.proj.base_layer(x) + (x @ a.T @ b.T) * (4 / 2)
        rows, lengths = h[batch.attention_mask.bool()], batch.attention_mask.sum(1).tolist()
        clipped = torch.cat([r * clip / torch.clamp(r.norm(), min=clip) for r in torch.split(rows, lengths)]) \
            if clip > 0 else rows
        loss = (clipped * g).sum() + nopeek * nopeek_loss(x, h, batch.attention_mask)
        grad_a, grad_b = torch.autograd.grad(loss, [a, b])
        torch.testing.assert_close(captured[names["A"]][k], grad_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(captured[names["B"]][k], grad_b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- LoRA ranks per device (lora.rank_policy)


def rank_runners(model: str, weights: str, device: DeviceRunner) -> dict[int, DeviceRunner]:
    """A device runner whose part peft built at each of RANKS (the global adapter's rank is `device`'s own), on
    the same base weights as `device`'s."""
    runners = {}
    for rank in sorted(set(RANKS)):
        runner, _, _ = parts(model, weights, f"lora.rank={rank}")
        mine = {n: t.data for n, t in runner.part.named_parameters() if "lora_" not in n}
        theirs = {n: t.data for n, t in device.part.named_parameters() if "lora_" not in n}
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
        runners[rank] = runner
    return runners


@pytest.mark.parametrize(("model", "weights"), [("tiny-llama", "nf4"), ("tiny-bert", "fp32")])
@pytest.mark.parametrize("fit", [FitInstructions(), FitInstructions(proximal_mu=5.0),
                                 FitInstructions(frozen=("lora_A",))], ids=["fedavg", "fedprox", "ffa-lora"])
def test_devices_at_their_own_ranks_equal_each_device_alone_through_peft_at_its_rank(
        model: str, weights: str, fit: FitInstructions, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks 2, 8, 4 and 8 in one cohort at the global rank 8: every message, gradient (zero-padded) and the
    zero-padded weighted sum equal each device run alone through a part peft built at its own rank (scaling
    alpha / its rank) from the global adapter cut to its rank, FedProx's anchor and FFA-LoRA's frozen A cut too.
    Seen failing with every device scaled by alpha / 8 (the global rank's scaling), and with FedProx's anchor
    left uncut (the zero rows then move)."""
    device, server, batches = parts(model, weights)
    assert max(RANKS) == tiny_config().lora.rank
    summed = assert_same(device, server, batches, monkeypatch, fit, ranks=rank_runners(model, weights, device))
    initial = device.initial_adapter()
    trained = sum(SIZES[i] for i, s in enumerate(STEPS) if s == 2)
    # devices 0 (rank 2), 2 (rank 4) and 3 (rank 8) finished: rows 4..7 of every A come from device 3 alone
    for name, tensor in summed.items():
        if "lora_A" in name and not fit.frozen:
            assert float((tensor[4:] / SIZES[3] - initial[name][4:]).abs().max()) > 1e-4  # device 3 trained them
    assert max(float((summed[n] / trained - initial[n]).abs().max()) for n in initial) > 1e-4


def test_the_zero_tail_beyond_each_devices_rank_stays_exactly_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """After two local steps with FedProx (its anchor cut to each rank), the rows of A and columns of B beyond
    each device's rank are exact zeros, and each device's own part moved. Seen failing with the anchor left uncut."""
    device, server, batches = parts("tiny-llama", "fp32")
    group = device.start([3, 8, 11, 14], device.initial_adapter(), 1.0, FitInstructions(proximal_mu=5.0),
                         list(RANKS))
    for step in range(2):
        live = [i for i, s in enumerate(STEPS) if s > step]
        messages = device.forward(group, live, [batches[i][step] for i in live], 0, step, [BITS[i] for i in live])
        device.backward(group, step, server.step(messages, 0, step).gradients)
    checked = 0
    for name, tensor in group.adapter.items():
        for i, r in enumerate(RANKS):
            own = tensor[i].detach()
            tail, head = (own[r:], own[:r]) if "lora_A" in name else (own[:, r:], own[:, :r])
            assert torch.count_nonzero(tail) == 0, (name, i)
            assert torch.count_nonzero(head) > 0 if "lora_A" in name else True
            checked += tail.numel()
    assert checked > 0


def test_equal_ranks_reduce_to_fedavg_exactly() -> None:
    """Every device at the global rank through the rank path (masks, per-device scaling vector) gives bitwise the
    same messages and weighted sum (the zero-padded average's numerator) as the plain FedAvg path: padding to
    the same rank is the identity and alpha / r as a float32 vector is peft's scalar. Tolerance: 0 (torch.equal).
    Seen failing with the mask cutting one row too many (beyond r - 1)."""
    device, server, batches = parts("tiny-llama", "fp32", "quant.gradient_bits=32", "quant.activation_bits=32")
    weights = [5.0, 3.0, 5.0, 2.0]
    sums = []
    for ranks in (None, [8, 8, 8, 8]):
        start = server.checkpoint()
        group = device.start([3, 8, 11, 14], device.initial_adapter(), 1.0, FitInstructions(), ranks)
        sent = []
        for step in range(2):
            messages = device.forward(group, [0, 1, 2, 3], [b[step] for b in batches], 0, step, [32] * 4)
            sent.append([codec.decode(m.activations) for m in messages])
            device.backward(group, step, server.step(messages, 0, step).gradients)
        server.restore(start)
        sums.append((sent, group.weighted_sum(weights)))
    (plain_sent, plain), (ranked_sent, ranked) = sums
    assert all(torch.equal(a, b) for x, y in zip(plain_sent, ranked_sent, strict=True)
               for a, b in zip(x, y, strict=True))
    assert plain.keys() == ranked.keys() and all(torch.equal(plain[n], ranked[n]) for n in plain)


def test_truncated_and_zero_padded_by_hand() -> None:
    """HetLoRA's download and upload: A (3, 2) cut to rank 2 keeps its first two rows, B (2, 3) its first two
    columns, a head tensor stays; padding back to 3 restores the shapes with zeros, and equal ranks are the
    identity (the same tensors)."""
    adapter = {"l.lora_A.default.weight": torch.arange(6.0).reshape(3, 2),
               "l.lora_B.default.weight": torch.arange(6.0).reshape(2, 3), "top.w": torch.ones(4)}
    cut = truncated(adapter, 2)
    assert cut["l.lora_A.default.weight"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert cut["l.lora_B.default.weight"].tolist() == [[0.0, 1.0], [3.0, 4.0]]
    assert cut["top.w"] is adapter["top.w"]
    back = zero_padded(cut, 3)
    assert back["l.lora_A.default.weight"].tolist() == [[0.0, 1.0], [2.0, 3.0], [0.0, 0.0]]
    assert back["l.lora_B.default.weight"].tolist() == [[0.0, 1.0, 0.0], [3.0, 4.0, 0.0]]
    same = zero_padded(adapter, 3)
    assert all(same[n] is adapter[n] for n in adapter)
