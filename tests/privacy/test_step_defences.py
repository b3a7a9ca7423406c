"""The defences act in the training step: clipped and noised smashed data, the clip's gradient, NoPeek, and the
(epsilon, delta) and leakage a run reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sflam.platform import codec
from sflam.platform.assembly import build_runners
from sflam.platform.data import collate
from sflam.platform.local import run_local
from sflam.privacy.metrics import distance_correlation
from tests.conftest import tiny_config

LOSSLESS = ("quant.activation_bits=32", "quant.gradient_bits=32", "allocation.distortion_bits=32")


def _messages(*overrides: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three devices' smashed data of one step as sent (decoded) and their masks."""
    _, device, _ = build_runners(tiny_config("model.name=tiny-bert", *LOSSLESS, *overrides))
    data, _, _ = build_runners(tiny_config("model.name=tiny-bert"))
    rng = np.random.default_rng(0)
    batches = [collate(data.train, rng.choice(len(data.train), 6, replace=False), data.pad_token_id)
               for _ in range(3)]
    group = device.start([0, 1, 2], device.initial_adapter())
    sent = device.forward(group, [0, 1, 2], batches, 0, 0, [32, 32, 32])
    return [codec.decode(m.activations) for m in sent], [b.attention_mask for b in batches]


def _sample_norms(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([piece.norm() for piece in torch.split(rows, mask.sum(1).tolist())])


def test_every_sample_is_sent_clipped_and_noised_with_sigma_times_c() -> None:
    plain, masks = _messages()
    clipped, _ = _messages("privacy.clip_norm=2.0")
    noised, _ = _messages("privacy.clip_norm=2.0", "privacy.noise_sigma=0.05")
    for rows, mask in zip(clipped, masks, strict=True):
        assert float(_sample_norms(rows, mask).max()) <= 2.0 * (1 + 1e-6)
    assert max(float(_sample_norms(r, m).max()) for r, m in zip(plain, masks, strict=True)) > 2.0  # it did clip
    noise = torch.cat([a - b for a, b in zip(noised, clipped, strict=True)])
    assert float(noise.std()) == pytest.approx(0.05 * 2.0, rel=0.05)
    assert abs(float(noise.mean())) < 0.01


def test_the_received_gradient_goes_back_through_the_clip() -> None:
    """With clipping the server's gradient is the clipped message's: the device's adapter gradient is the chain rule
    through y = x min(1, C / ||x||) per sample, computed here by autograd on an explicit clip of the device part's
    own forward (a backward that skipped the clip would be off by the clip's factor, here about 60x)."""
    from sflam.platform import cohort
    from tests.reference import start

    clip = 0.5
    data, device, server = build_runners(tiny_config("model.name=tiny-bert", *LOSSLESS, f"privacy.clip_norm={clip}"))
    batch = collate(data.train, np.arange(6), data.pad_token_id)
    group = device.start([0], device.initial_adapter())
    messages = device.forward(group, [0], [batch], 0, 0, [32])
    received = server.step(messages, 0, 0).gradients
    got: dict[str, torch.Tensor] = {}
    original = cohort.local_step
    cohort.local_step = lambda adapter, *_: got.update(  # type: ignore[assignment]
        {n: t.grad[0].detach().clone() for n, t in adapter.items() if t.grad is not None})
    try:
        device.backward(group, 0, received)
    finally:
        cohort.local_step = original
    # the reference: one device's adapter, the clip written out, the received gradient on the clipped rows
    state = start(device, 0, device.initial_adapter())
    hidden = torch.func.functional_call(device.part, state.adapter, (batch.input_ids, batch.attention_mask),
                                        strict=False)
    rows = hidden[batch.attention_mask.bool()]
    pieces = torch.split(rows, batch.attention_mask.sum(1).tolist())
    clipped = torch.cat([p * torch.clamp(clip / p.norm(), max=1.0) for p in pieces])
    (clipped * codec.decode(received[0])).sum().backward()
    expected = {n: t.grad for n, t in state.adapter.items() if t.grad is not None}
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert float((got[name] - tensor).abs().max()) <= 1e-5 * float(tensor.abs().max()) + 1e-12, name


def test_nopeek_lowers_the_distance_correlation_it_penalises() -> None:
    def correlation(*extra: str) -> float:
        config = tiny_config("model.name=tiny-bert", "train.rounds=4", "train.device_lr=0.05", *extra)
        result = run_local(config)
        data, device, _ = build_runners(config)
        batch = collate(data.test, np.arange(32), data.pad_token_id)
        with torch.no_grad():
            hidden = torch.func.functional_call(device.part, result.device_adapter,
                                                (batch.input_ids, batch.attention_mask), strict=False)
            inputs = device.part.input_vectors(batch.input_ids)
        keep = batch.attention_mask[..., None].float()
        return float(distance_correlation(inputs * keep, hidden * keep))

    assert correlation("privacy.nopeek_weight=5.0") < correlation() - 0.005


def test_a_run_reports_its_epsilon_and_that_labels_are_sent() -> None:
    from opacus.accountants import RDPAccountant

    config = tiny_config("model.name=tiny-bert", "privacy.clip_norm=5", "privacy.noise_sigma=2.0", "train.rounds=2")
    result = run_local(config)
    summary = result.summary()
    data, _, _ = build_runners(config)
    # the most exposed sample: its device in every round, drawn ceil(E min(b, n) / n) times a round
    sizes = np.array([len(s) for s in data.shards])
    per_round = max(math.ceil(2 * min(8, n) / n) for n in sizes)
    accountant = RDPAccountant()
    for _ in range(2 * per_round):
        accountant.step(noise_multiplier=2.0 / 2, sample_rate=1.0)
    assert summary["privacy_releases"] == 2 * per_round
    assert summary["privacy_epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert summary["labels_sent"] is True
    assert run_local(tiny_config("model.name=tiny-bert", "split.head=device", "train.rounds=1")
                     ).summary()["labels_sent"] is False


def test_a_run_measures_its_leakage_every_n_rounds() -> None:
    config = tiny_config("model.name=tiny-bert", "train.rounds=4", "privacy.evaluate_every=2",
                         "privacy.monitor_aux_samples=200", "privacy.victims=16")
    result = run_local(config)
    measured = [r.round for r in result.rounds if r.leakage is not None]
    assert measured == [2, 4]
    assert all(0 <= r.leakage <= 1 and "leakage_linear_token_accuracy" in r.leakage_metrics
               for r in result.rounds if r.leakage is not None)
    assert result.summary()["leakage"] == result.rounds[-1].leakage
