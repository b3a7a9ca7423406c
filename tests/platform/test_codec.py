"""Smashed-data codec: unbiased, variance within Δ²/4, exact payload, lossless at 32 bits
(docs/concepts/split-and-codec.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sflam.platform import codec
from sflam.platform.errors import CodecError


def _rows(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 10, generator=g) * 3 + torch.linspace(-5, 5, 12)[:, None]


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_pack_roundtrip_exact_levels(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    levels = torch.randint(0, 2**bits, (37,), generator=g).numpy()
    packed = codec._pack(levels, bits)
    assert packed.nbytes == math.ceil(37 * bits / 8)
    assert (codec._unpack(packed, bits, 37) == levels).all()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("side", ["fp32", "fp16"])
def test_unbiased_and_variance_bound(bits: int, side: str) -> None:
    x = _rows()
    draws = 4000
    # every copy of a row is an independent draw with the same offset and scale
    copies = x.repeat(draws, 1)
    decoded = codec.decode(codec.encode(copies, bits, torch.Generator().manual_seed(42), side)).double()
    error = (decoded - copies.double()).reshape(draws, *x.shape)
    total = error.sum(dim=0)
    total_sq = (error * error).sum(dim=0)
    mean_error = total / draws
    variance = total_sq / draws - mean_error**2
    delta = codec.step_size(x, bits).double()[:, None] * (1 + 1e-3)  # fp16 side info widens Δ by < 0.1%
    bound = delta**2 / 4
    # unbiased: the mean error is within 5 standard errors of zero (plus fp32 rounding of the decode)
    fp32_slack = 1e-6 * x.abs().max()
    assert (mean_error.abs() <= 5 * torch.sqrt(bound / draws) + fp32_slack).all()
    # per-element variance never above Δ²/4 beyond sampling noise (relative sd of a variance ~ sqrt(2/n))
    assert (variance <= bound * (1 + 5 * math.sqrt(2 / draws)) + fp32_slack**2).all()
    # and it is the stochastic-rounding variance, not zero: the codec is really lossy
    assert variance.max() > 0.1 * bound.max()


@pytest.mark.parametrize("bits", [1, 3, 4, 8, 16, 32])
@pytest.mark.parametrize("side", ["fp32", "fp16"])
def test_payload_size_is_exact(bits: int, side: str) -> None:
    x = torch.randn(7, 33)
    encoded = codec.encode(x, bits, torch.Generator().manual_seed(0), side)
    side_bits = 0 if bits == 32 else 7 * 2 * (32 if side == "fp32" else 16)
    assert encoded.payload_bits == 8 * math.ceil(7 * 33 * bits / 8) + side_bits
    assert encoded.payload_bits == codec.payload_bits(7, 33, bits, side)


def test_32_bits_is_lossless() -> None:
    x = torch.randn(5, 3, 17)
    assert torch.equal(codec.decode(codec.encode(x, 32)), x)


def test_decoded_values_stay_in_row_range() -> None:
    x = _rows()
    decoded = codec.decode(codec.encode(x, 3, torch.Generator().manual_seed(1)))
    assert (decoded.min(dim=1).values >= x.min(dim=1).values - 1e-5).all()
    assert (decoded.max(dim=1).values <= x.max(dim=1).values + 1e-5).all()


def test_constant_rows_are_exact() -> None:
    x = torch.full((4, 9), 2.5)
    assert torch.equal(codec.decode(codec.encode(x, 4)), x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_rejected(bad: float) -> None:
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(CodecError, match="non-finite"):
        codec.encode(x, 8)


@pytest.mark.parametrize("bits", [0, 17, 31, 64])
def test_bad_bit_width_is_rejected(bits: int) -> None:
    with pytest.raises(CodecError, match=r"1\.\.16"):
        codec.encode(torch.randn(2, 2), bits)


def test_fp16_side_info_out_of_range_is_rejected() -> None:
    with pytest.raises(CodecError, match="fp16"):
        codec.encode(torch.tensor([[1e6, 0.0]]), 8, side_dtype="fp16")


@pytest.mark.parametrize("scale", [1e-8, 1e-6, 1e-3, 1.0, 1e3])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fp32_side_information_keeps_the_ideal_step_at_every_magnitude(scale: float, bits: int) -> None:
    """Activation gradients of a mean loss over many devices are ~1e-6 and smaller: the bound holds with the
    ideal step Δ = range / (2^q - 1), no widening, from 1e-8 to 1e3."""
    x = _rows(1) * scale
    draws = 3000
    copies = x.repeat(draws, 1)
    decoded = codec.decode(codec.encode(copies, bits, torch.Generator().manual_seed(7), "fp32")).double()
    error = (decoded - copies.double()).reshape(draws, *x.shape)
    mean_error = error.mean(dim=0)
    variance = (error * error).mean(dim=0) - mean_error**2
    rows = x.double()
    delta = ((rows.max(dim=1).values - rows.min(dim=1).values) / (2**bits - 1))[:, None]  # the ideal step
    bound = delta**2 / 4
    fp32_slack = 1e-6 * float(rows.abs().max())
    assert (mean_error.abs() <= 5 * torch.sqrt(bound / draws) + fp32_slack).all()
    assert (variance <= bound * (1 + 5 * math.sqrt(2 / draws)) + fp32_slack**2).all()
    assert variance.max() > 0.1 * bound.max()
    # the allocator's distortion is the codec's: D(q) = Δ²/4 relative to the range squared
    from sflam.platform.allocation import distortion

    ranges = rows.max(dim=1).values - rows.min(dim=1).values
    assert torch.allclose(bound[:, 0] / ranges**2, torch.full_like(ranges, float(distortion(bits))), rtol=1e-12)


def test_fp16_side_information_that_would_widen_the_step_is_refused() -> None:
    """At 1e-6 fp16 is subnormal: its step would be several times the ideal, so fp16 side information is refused
    (and gradients always travel with fp32 side information)."""
    with pytest.raises(CodecError, match="widen"):
        codec.encode(_rows() * 1e-6, 8, torch.Generator().manual_seed(0), "fp16")
    assert codec.GRADIENT_SIDE_DTYPE == "fp32"


@pytest.mark.parametrize("side", ["fp32", "fp16"])
def test_many_devices_encoded_at_once_equal_each_encoded_alone(side: str) -> None:
    """`encode_many` (one pass over every device's rows) gives each device exactly `encode`'s bytes."""
    counts, bits = [3, 1, 4, 2, 5, 3], [8, 4, 3, 8, 12, 32]
    rows = torch.randn(sum(counts), 10, generator=torch.Generator().manual_seed(1))
    rows[3] = 0.5  # a constant row: zero scale
    many = codec.encode_many(rows, counts, bits, [torch.Generator().manual_seed(k) for k in range(len(counts))], side)
    for k, (piece, encoded) in enumerate(zip(torch.split(rows, counts), many, strict=True)):
        alone = codec.encode(piece, bits[k], torch.Generator().manual_seed(k), side)
        assert encoded.bits == alone.bits and encoded.shape == alone.shape
        assert np.array_equal(encoded.packed, alone.packed)
        for a, b in ((encoded.offset, alone.offset), (encoded.scale, alone.scale)):
            assert (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
    assert torch.equal(codec.decode_many(many[:4]), torch.cat([codec.decode(e) for e in many[:4]]))


def test_messages_and_gradients_cross_processes_as_the_same_values() -> None:
    """A worker's messages and the server's gradients pickle as a few arrays and come back value for value."""
    import pickle

    from sflam.platform.messages import Messages, Smashed

    rows = torch.randn(9, 6, generator=torch.Generator().manual_seed(2))
    encoded = codec.encode_many(rows, [4, 2, 3], [8, 32, 3], [torch.Generator().manual_seed(k) for k in range(3)])
    masks = [torch.tensor([[1, 1, 1], [1, 0, 0]]), torch.tensor([[1, 1, 0]]), torch.tensor([[1], [1], [1]])]
    sent = Messages(Smashed(k, e, m, torch.arange(m.shape[0])) for k, e, m in zip((5, 9, 2), encoded, masks,
                                                                                   strict=True))
    back = pickle.loads(pickle.dumps(sent))
    assert isinstance(back, Messages) and len(back) == 3
    for a, b in zip(sent, back, strict=True):
        assert a.device == b.device and a.payload_bits == b.payload_bits
        assert torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.labels, b.labels)
        assert torch.equal(codec.decode(a.activations), codec.decode(b.activations))
    gradients = codec.EncodedList([encoded[0], None, encoded[2]])
    returned = pickle.loads(pickle.dumps(gradients))
    assert returned[1] is None and [e.payload_bits for e in returned if e] == [encoded[0].payload_bits,
                                                                               encoded[2].payload_bits]
    assert torch.equal(codec.decode_many([returned[0], returned[2]]), codec.decode_many([encoded[0], encoded[2]]))
