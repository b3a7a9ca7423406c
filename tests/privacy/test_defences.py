"""Defences: per-sample clipping of whole messages, Gaussian noise of sigma*C, NoPeek's distance correlation."""

from __future__ import annotations

import pytest
import torch

from sflam.privacy.defences import clip_and_noise, clip_and_noise_packed, clip_packed, nopeek_loss, sample_norms


def _messages(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 1, 5, 2])
    scales = torch.tensor([1.0, 4.0, 0.1, 2.0]).repeat_interleave(lengths)[:, None]
    rows = torch.randn(int(lengths.sum()), 16, generator=generator) * scales
    return rows, lengths


def test_clipping_bounds_each_whole_sample_and_keeps_small_ones() -> None:
    rows, lengths = _messages()
    norms = sample_norms(rows, lengths)
    clip = float(norms.sort().values[1:3].mean())  # between the two middle norms: two samples clipped, two not
    clipped = clip_packed(rows, lengths, clip)
    after = sample_norms(clipped, lengths)
    assert bool((after <= clip * (1 + 1e-6)).all())
    big = norms > clip
    assert torch.allclose(after[big], torch.full_like(after[big], clip))  # scaled onto the sphere, not cut per row
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    assert torch.equal(clipped[~big[owner]], rows[~big[owner]])
    # direction kept: each sample's rows scaled by one factor
    for i in torch.nonzero(big).flatten().tolist():
        ratio = clipped[owner == i] / rows[owner == i]
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))
    assert torch.equal(clip_packed(rows, lengths, 0.0), rows)


def test_clipped_messages_of_two_inputs_differ_by_at_most_2c() -> None:
    a, lengths = _messages(1)
    b, _ = _messages(2)
    clip = 1.5
    difference = sample_norms(clip_packed(a, lengths, clip) - clip_packed(b, lengths, clip), lengths)
    assert bool((difference <= 2 * clip + 1e-6).all())
    opposite = sample_norms(clip_packed(a, lengths, clip) - clip_packed(-a, lengths, clip), lengths)
    assert float(opposite.max()) == pytest.approx(2 * clip, rel=1e-6)  # the sensitivity 2C is attained


def test_noise_has_standard_deviation_sigma_c_and_is_seeded() -> None:
    rows = torch.zeros(4000, 64)
    lengths = torch.full((100,), 40)
    noisy = clip_and_noise_packed(rows, lengths, 2.0, 0.3, torch.Generator().manual_seed(5))
    assert float(noisy.std()) == pytest.approx(0.6, rel=0.01)
    assert float(noisy.mean()) == pytest.approx(0.0, abs=0.005)
    again = clip_and_noise_packed(rows, lengths, 2.0, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(noisy, again)
    with pytest.raises(ValueError, match="clip norm"):
        clip_and_noise_packed(rows, lengths, 0.0, 0.3)
    with pytest.raises(ValueError, match="lengths"):
        clip_and_noise_packed(rows, lengths[:-1], 2.0, 0.3)


def test_per_sample_form_equals_the_packed_form_and_gradients_flow() -> None:
    rows, lengths = _messages(3)
    rows.requires_grad_(True)
    packed = clip_and_noise_packed(rows, lengths, 2.0, 0.1, torch.Generator().manual_seed(9))
    samples = clip_and_noise(list(torch.split(rows, lengths.tolist())), 2.0, 0.1, torch.Generator().manual_seed(9))
    assert torch.equal(torch.cat(samples), packed)
    packed.sum().backward()
    assert rows.grad is not None and bool(torch.isfinite(rows.grad).all())
    assert clip_and_noise([], 1.0, 0.1) == []


def test_nopeek_is_high_for_a_leaky_map_and_ignores_padding() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 6, 2, generator=generator)
    mask = torch.ones(256, 6, dtype=torch.long)
    mask[:, 4:] = 0
    leaky = inputs.repeat(1, 1, 2)
    unrelated = torch.randn(256, 6, 4, generator=generator)
    assert float(nopeek_loss(inputs, leaky, mask)) == pytest.approx(1.0, abs=1e-5)
    assert float(nopeek_loss(inputs, unrelated, mask)) < 0.5  # the sample dCor of independent data: biased above 0
    # what sits in padded positions never counts
    noisy_padding = leaky.clone()
    noisy_padding[:, 4:] = torch.randn(256, 2, 4, generator=generator)
    assert float(nopeek_loss(inputs, noisy_padding, mask)) == pytest.approx(float(nopeek_loss(inputs, leaky, mask)))
