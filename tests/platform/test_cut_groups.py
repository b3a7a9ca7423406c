"""Devices at different cuts in one server step: the server part, built at the shallowest cut, runs each device's
samples from its own cut upward, batched by cut group; the split stays exact
(docs/concepts/split-and-codec.md#devices-at-different-cuts)."""

from __future__ import annotations

import copy
import itertools
import pickle

import numpy as np
import peft
import pytest
import torch

from sflam.platform import codec
from sflam.platform import server as server_module
from sflam.platform.config import ModelConfig
from sflam.platform.messages import Messages, Smashed
from sflam.platform.models import load_model, resolve_model
from sflam.platform.server import ServerRunner, cut_chunks, cut_groups, server_chunks
from sflam.platform.split import DevicePart, HeadPart, ServerPart

pytestmark = pytest.mark.equality

TOL = 1e-5
LENGTHS = [11, 7, 3, 9, 5, 10, 2, 8]  # eight samples, right-padded to 11 tokens
TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 1500, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = (torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS)[:, None]).long()
    ids[mask == 0] = 0
    return ids, mask, torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])


def _model(name: str) -> tuple[torch.nn.Module, str, int]:
    """A model with real peft LoRA in every block (B drawn non-zero, so A's gradients are not zero), every
    parameter trainable: its family and its number of blocks beside it."""
    spec = resolve_model(ModelConfig(name=name))
    model = load_model(spec, ModelConfig(name=name), num_labels=2, pad_token_id=0)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=TARGETS[spec.family]), model)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
        p.requires_grad_(True)
    return model, spec.family, spec.num_layers


def _devices(cuts: list[int]) -> list[slice]:
    """Each device's samples: the batch cut into len(cuts) runs in order."""
    edges = np.linspace(0, len(LENGTHS), len(cuts) + 1).astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _uplink(model, family: str, cuts: list[int], ids, mask, labels, send_labels: bool = True):
    """Each device's forward at its own cut and its raw (32-bit) message; the device's hidden states beside."""
    messages, hiddens = [], []
    for k, (cut, rows) in enumerate(zip(cuts, _devices(cuts), strict=True)):
        length = int(mask[rows].sum(1).max())  # trimmed to its own longest sequence, as a device does
        own_mask = mask[rows, :length]
        hidden = DevicePart(model, family, cut)(ids[rows, :length], own_mask)
        hiddens.append((hidden, own_mask))
        messages.append(Smashed(k, codec.encode(hidden[own_mask.bool()], 32), own_mask,
                                labels[rows] if send_labels else labels[rows][:0], cut))
    return messages, hiddens


def _device_backward(hiddens, gradients) -> None:
    for (hidden, own_mask), gradient in zip(hiddens, gradients, strict=True):
        full = torch.zeros_like(hidden)
        full[own_mask.bool()] = codec.decode(gradient)
        hidden.backward(full)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _unsplit(model, ids, mask, labels) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    expected = _grads(model)
    model.zero_grad()
    return float(loss.detach()), expected


def _worst(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest error over the tensor's scale (floored at 1e-3 of the largest gradient: see test_split)."""
    scale = max(float(t.abs().max()) for t in expected.values())
    errors = {n: float((got[n] - expected[n]).abs().max() / expected[n].abs().max().clamp_min(1e-3 * scale))
              for n in expected}
    name = max(errors, key=errors.__getitem__)
    return errors[name], name


# --------------------------------------------------------------------------- the grouping, pure


def test_cut_groups_and_their_chunks() -> None:
    """Samples grouped by cut, shallowest first; each group in its own length chunks, never mixing cuts; one cut
    alone is exactly `server_chunks`."""
    groups = cut_groups([3, 1, 3, 2, 1])
    assert list(groups) == [1, 2, 3]
    assert [g.tolist() for g in groups.values()] == [[1, 4], [3], [0, 2]]
    lengths = np.array([5, 9, 2, 7, 4, 8, 3, 6])
    assert cut_chunks([1] * 8, lengths)[0][0] == 1
    assert [c.tolist() for _, c in cut_chunks([1] * 8, lengths)] == [c.tolist() for c in server_chunks(lengths)]
    cuts = np.array([2, 0, 2, 0, 2, 2, 0, 2])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_module, "SERVER_CHUNK_SAMPLES", 2)
        chunks = cut_chunks(cuts, lengths)
        assert [c.tolist() for _, c in cut_chunks(np.zeros(8, int), lengths)] == [
            c.tolist() for c in server_chunks(lengths)]
    # cut 0: samples 1, 3, 6 (lengths 9, 7, 3) by length; cut 2: samples 0, 2, 4, 5, 7 (5, 2, 4, 8, 6) by length
    assert [(cut, c.tolist()) for cut, c in chunks] == [(0, [6, 3]), (0, [1]), (2, [2, 4]), (2, [0, 7]), (2, [5])]
    assert sorted(np.concatenate([c for _, c in chunks]).tolist()) == list(range(8))


def test_the_cut_travels_with_the_messages() -> None:
    """A worker's messages pickled as a few arrays keep each device's cut (None: the server part's own)."""
    rows = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    encoded = codec.encode_many(rows, [3, 2, 1], [32, 8, 32], [torch.Generator().manual_seed(k) for k in range(3)])
    masks = [torch.tensor([[1, 1], [1, 0]]), torch.tensor([[1, 1]]), torch.tensor([[1]])]
    sent = Messages(Smashed(k, e, m, torch.arange(m.shape[0]), cut)
                    for k, e, m, cut in zip((4, 7, 1), encoded, masks, (2, None, 0), strict=True))
    back = pickle.loads(pickle.dumps(sent))
    assert [m.cut for m in back] == [2, None, 0] and [m.device for m in back] == [4, 7, 1]


def test_a_device_below_the_server_parts_cut_is_refused() -> None:
    model, family, layers = _model("tiny-llama")
    part = ServerPart(model, family, 2, "classification")
    assert (part.start_of(None), part.start_of(2), part.start_of(layers)) == (0, 0, layers - 2)
    for cut in (1, layers + 1):
        with pytest.raises(ValueError, match=f"cut {cut} outside the server part's 2..{layers}"):
            part.start_of(cut)
    ids, mask, labels = _batch()
    messages, _ = _uplink(model, family, [1, 2], ids, mask, labels)
    with pytest.raises(ValueError, match="cut 1 outside"):
        ServerRunner(part, 32, "fp32", lr=1e-3, seed=0, send_gradients=True).step(messages, 0, 0)


# --------------------------------------------------------------------------- exactness against the unsplit model


CASES = [("tiny-bert", 1, [1, 3]), ("tiny-bert", 0, [0, 2, 4]), ("tiny-llama", 1, [1, 3]),
         ("tiny-llama", 0, [2, 0, 4]), ("tiny-gpt2", 1, [3, 1]), ("tiny-gpt2", 1, [2, 3])]


def _check_mixed_step(name: str, server_cut: int, cuts: list[int], chunk: int | None = None, tol: float = TOL
                      ) -> None:
    model, family, _ = _model(name)
    ids, mask, labels = _batch()
    reference, expected = _unsplit(model, ids, mask, labels)
    server = ServerRunner(ServerPart(model, family, server_cut, "classification"), 32, "fp32", lr=1e-3, seed=0,
                          send_gradients=True)
    server.optimizer = None  # compare gradients, not updated weights
    messages, hiddens = _uplink(model, family, cuts, ids, mask, labels)
    with pytest.MonkeyPatch.context() as patch:
        if chunk is not None:
            patch.setattr(server_module, "SERVER_CHUNK_SAMPLES", chunk)
        result = server.step(messages, 0, 0)
    _device_backward(hiddens, result.gradients)
    got = _grads(model)
    assert abs(result.loss - reference) <= TOL * reference
    assert result.samples == len(LENGTHS)
    assert got.keys() == expected.keys() and any("lora_A" in n for n in got)
    worst, worst_name = _worst(got, expected)
    assert worst <= tol, f"largest relative gradient error {worst:.2e} in {worst_name}"


@pytest.mark.parametrize(("name", "server_cut", "cuts"), CASES)
def test_devices_at_different_cuts_in_one_step_are_exact(name: str, server_cut: int, cuts: list[int]) -> None:
    """Devices at their own cuts (device parts sharing the model's modules), raw 32-bit smashed data up, one server
    step, raw gradients down, each device's backward: loss and every gradient (LoRA on both sides of every cut,
    frozen-to-be base weights, the head) equal the unsplit model's on all samples. A block between two cuts gets its
    gradient from the server (the shallower group) plus the deeper devices' own backward, as the unsplit model's."""
    _check_mixed_step(name, server_cut, cuts)


def test_cut_groups_in_several_chunks_are_exact() -> None:
    """Chunks of 2 samples: each cut group in its own chunks, each chunk's loss weighted by its share of all."""
    _check_mixed_step("tiny-llama", 0, [0, 3, 1, 3], chunk=2)


@pytest.mark.integration
@pytest.mark.parametrize(("server_cut", "cuts"), [(1, [1, 4]), (0, [0, 6])])
def test_packaged_minilm_at_two_cuts_is_exact(server_cut: int, cuts: list[int]) -> None:
    """The pretrained encoder's gradients round more coarsely than the random tiny models': on this batch the split
    at one cut ([1, 1]) already differs from the unsplit model by 2.2e-5 (layer 5's output LayerNorm bias), the two
    cuts by 1.2e-5, both at the floor of test_split's measure; hence 3e-5 here."""
    _check_mixed_step("minilm-l6", server_cut, cuts, tol=3e-5)


@pytest.mark.parametrize(("name", "cuts"), [("tiny-bert", [1, 3]), ("tiny-llama", [3, 1, 4])])
def test_a_u_shaped_split_at_different_cuts_is_exact(name: str, cuts: list[int]) -> None:
    """The head on the devices: the server part's features of each cut group down, the head's mean loss over all
    samples, the features' gradient up, the smashed data's gradient down; every gradient equals the unsplit
    model's."""
    model, family, _ = _model(name)
    ids, mask, labels = _batch()
    reference, expected = _unsplit(model, ids, mask, labels)
    part = ServerPart(model, family, min(cuts), "classification")
    head = HeadPart(part)
    server = ServerRunner(part, 32, "fp32", lr=1e-3, seed=0, send_gradients=True)
    server.optimizer = None
    messages, hiddens = _uplink(model, family, cuts, ids, mask, labels, send_labels=False)
    features = server.forward_features(messages, 0, 0, 32)
    up = []
    loss_sum = 0.0
    for encoded, rows in zip(features, _devices(cuts), strict=True):  # each device: the head on its own samples
        own = codec.decode(encoded).requires_grad_(True)
        loss, _ = head.loss_and_correct(head(own), labels[rows])
        (loss * (len(own) / len(LENGTHS))).backward()
        loss_sum += float(loss.detach()) * len(own)
        up.append(codec.encode(own.grad, 32))
    _device_backward(hiddens, server.backward_features(messages, up, 0, 0))
    got = _grads(model)
    assert abs(loss_sum / len(LENGTHS) - reference) <= TOL * reference
    assert got.keys() == expected.keys()
    worst, worst_name = _worst(got, expected)
    assert worst <= TOL, f"largest relative gradient error {worst:.2e} in {worst_name}"


# --------------------------------------------------------------------------- against the step composed by hand


def test_a_mixed_step_is_the_share_weighted_sum_of_its_groups() -> None:
    """The grouped step's loss, server gradients and activation gradients equal each cut group run on its own from
    its cut (`ServerPart(start=...)`), its mean loss times its share of all samples, summed."""
    model, family, _ = _model("tiny-gpt2")
    ids, mask, labels = _batch()
    cuts = [1, 3, 1, 2]
    part = ServerPart(model, family, 1, "classification")
    server = ServerRunner(part, 32, "fp32", lr=1e-3, seed=0, send_gradients=True)
    server.optimizer = None
    messages, _ = _uplink(model, family, cuts, ids, mask, labels)
    model.zero_grad()
    result = server.step(messages, 0, 0)
    got = {n: p.grad.clone() for n, p in part.named_parameters() if p.grad is not None}
    got_down = [codec.decode(g) for g in result.gradients]
    model.zero_grad()
    by_hand, down = 0.0, {}
    for cut, members in cut_groups(cuts).items():  # the devices of each group, batched
        group = [messages[int(k)] for k in members]
        hidden, group_mask, group_labels = ServerRunner.assemble(group)
        hidden.requires_grad_(True)
        loss, _ = part.loss_and_correct(part(hidden, group_mask, cut - 1), group_labels)
        share = len(group_labels) / len(LENGTHS)
        (loss * share).backward()
        by_hand += float(loss.detach()) * share
        rows = hidden.grad[group_mask.bool()]  # type: ignore[index]
        counts = np.cumsum([0] + [int(m.attention_mask.sum()) for m in group])
        for k, (a, b) in zip(members, itertools.pairwise(counts), strict=True):
            down[int(k)] = rows[a:b]
    expected = {n: p.grad.clone() for n, p in part.named_parameters() if p.grad is not None}
    assert result.loss == pytest.approx(by_hand, rel=1e-6)
    assert got.keys() == expected.keys()
    worst, worst_name = _worst(got, expected)
    assert worst <= 1e-6, f"largest relative gradient error {worst:.2e} in {worst_name}"
    for k, rows in enumerate(got_down):
        assert torch.allclose(rows, down[k], rtol=1e-5, atol=1e-7 * float(down[k].abs().max())), k


# --------------------------------------------------------------------------- one cut: today's step, bit for bit


def _step_before_cut_groups(part: ServerPart, optimizer, messages: list[Smashed]) -> tuple[float, torch.Tensor]:
    """ServerRunner.step's forward/backward as it was before cut groups (sflam 17913fb): every sample from the
    server part's cut, in `server_chunks`; the loss and the raw activation-gradient rows."""
    masks = [m.attention_mask for m in messages]
    lengths = torch.cat([mask.sum(1) for mask in masks]).long()
    labels = torch.cat([m.labels for m in messages])
    total = int(labels.shape[0])
    rows = codec.decode_many([m.activations for m in messages])
    chunks = server_chunks(lengths.numpy())
    starts = torch.cumsum(lengths, 0) - lengths
    grad_rows = torch.empty_like(rows)
    loss_sum = 0.0
    for positions in chunks:
        chunk = torch.from_numpy(positions)
        index, mask, hidden = server_module._chunk_batch(rows, lengths, starts, chunk, masks[0].dtype)
        hidden.requires_grad_(True)
        loss, _ = part.loss_and_correct(part(hidden, mask), labels[chunk])
        if len(chunks) > 1:
            loss = loss * (len(positions) / total)
        loss.backward()
        loss_sum += float(loss.detach())
        grad_rows[index] = hidden.grad[mask.bool()]  # type: ignore[index]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_rows


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("explicit", [False, True])
def test_every_device_at_the_servers_cut_is_todays_step_bit_for_bit(chunk: int | None, explicit: bool) -> None:
    """Every message at the server part's cut (no cut, or the cut named): loss, activation gradients and the
    parameters after the AdamW step are torch.equal to the step before cut groups, in one chunk and in several."""
    model, family, _ = _model("tiny-llama")
    twin = copy.deepcopy(model)
    ids, mask, labels = _batch()
    messages, _ = _uplink(model, family, [2, 2, 2], ids, mask, labels)
    for m in messages:
        m.cut = 2 if explicit else None
    part, twin_part = ServerPart(model, family, 2, "classification"), ServerPart(twin, family, 2, "classification")
    server = ServerRunner(part, 32, "fp32", lr=1e-2, seed=0, send_gradients=True)
    twin_optimizer = torch.optim.AdamW([p for p in twin_part.parameters() if p.requires_grad], lr=1e-2,
                                       weight_decay=0.0)
    model.zero_grad()
    twin.zero_grad()
    before = {n: p.detach().clone() for n, p in part.named_parameters()}
    with pytest.MonkeyPatch.context() as patch:
        if chunk is not None:
            patch.setattr(server_module, "SERVER_CHUNK_SAMPLES", chunk)
        result = server.step(messages, 0, 0)
        loss, grad_rows = _step_before_cut_groups(twin_part, twin_optimizer, messages)
    assert result.loss == loss
    assert torch.equal(codec.decode_many(result.gradients), grad_rows)  # type: ignore[arg-type]
    after, twin_after = dict(part.named_parameters()), dict(twin_part.named_parameters())
    assert after.keys() == twin_after.keys()
    assert any(not torch.equal(after[n], before[n]) for n in after)  # the step moved the weights
    for n in after:
        assert torch.equal(after[n], twin_after[n]), n
