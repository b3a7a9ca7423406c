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


@pytest.mark.parametrize("at_once", [False, True])
def test_decoded_values_stay_in_row_range(at_once: bool) -> None:
    """Each row decodes within its own [min, max], whether encoded alone or with other devices' rows."""
    x = _rows()
    if at_once:
        generators = [torch.Generator().manual_seed(k) for k in (1, 2)]
        decoded = codec.decode_many(codec.encode_many(x, [5, 7], [3, 3], generators))
    else:
        decoded = codec.decode(codec.encode(x, 3, torch.Generator().manual_seed(1)))
    assert decoded.dtype == torch.float32
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
    # three devices of different sizes share 3 bits (rows that end inside a byte), one sends 9 bits (past a byte)
    counts, bits = [3, 1, 4, 2, 5, 3, 2, 6, 1], [8, 4, 3, 8, 12, 32, 3, 3, 9]
    rows = torch.randn(sum(counts), 10, generator=torch.Generator().manual_seed(1))
    rows[3] = 0.5  # a constant row: zero scale
    many = codec.encode_many(rows, counts, bits, [torch.Generator().manual_seed(k) for k in range(len(counts))], side)
    for k, (piece, encoded) in enumerate(zip(torch.split(rows, counts), many, strict=True)):
        alone = codec.encode(piece, bits[k], torch.Generator().manual_seed(k), side)
        assert encoded.bits == alone.bits and encoded.shape == alone.shape
        assert encoded.payload_bits == alone.payload_bits == codec.payload_bits(counts[k], 10, bits[k], side)
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


def test_many_tensors_decoded_at_once_equal_each_decoded_alone() -> None:
    """`decode_many` of tensors at one bit width (the server's one pass over every device's smashed data) gives
    `decode`'s rows of each in turn; so do mixed widths and raw fp32 (decoded one by one)."""
    g = torch.Generator().manual_seed(3)
    same = [codec.encode(torch.randn(2, n, 10, generator=g) * (n + 1), 4, g) for n in (1, 3, 2)]
    mixed = [codec.encode(torch.randn(n, 10, generator=g), q, g) for n, q in ((3, 3), (1, 32), (2, 5))]
    for encoded in (same, mixed, same[:1]):
        alone = torch.cat([codec.decode(e).reshape(-1, 10) for e in encoded])
        assert torch.equal(codec.decode_many(encoded), alone)
    assert codec.decode_many(same).shape == (12, 10) and codec.decode_many(same).dtype == torch.float32


def test_scalars_single_rows_and_empty_tensors_encode_as_rows() -> None:
    """A 0-d tensor is one row of one value, a 1-d tensor one row (each decodes to its own shape, within one step,
    with the exact payload), an empty tensor no rows and no payload; the step of a 3-d tensor is per last-dimension
    row."""
    g = torch.Generator().manual_seed(4)
    scalar = codec.encode(torch.tensor(2.5), 8, g)
    assert scalar.payload_bits == codec.payload_bits(1, 1, 8) and torch.equal(codec.decode(scalar), torch.tensor(2.5))
    vector = torch.linspace(-1.0, 2.0, 10)
    row = codec.encode(vector, 8, g)
    assert row.payload_bits == codec.payload_bits(1, 10, 8) and codec.decode(row).dtype == torch.float32
    assert float((codec.decode(row) - vector).abs().max()) <= 3.0 / 255 * (1 + 1e-5)
    empty = codec.encode(torch.zeros(3, 0), 8, g)
    assert empty.payload_bits == 0 and empty.shape == (3, 0)
    x = torch.arange(60, dtype=torch.float32).reshape(2, 3, 10) ** 1.5
    rows = x.reshape(6, 10)
    assert torch.allclose(codec.step_size(x, 4), (rows.max(dim=1).values - rows.min(dim=1).values) / 15)


def test_lists_with_both_side_dtypes_cross_processes_as_they_are() -> None:
    """Gradients of devices at different side dtypes (fp16 and fp32 side information) or none (raw fp32), with
    gaps for devices that sent nothing, pickle back value for value, each with its own side dtype and payload."""
    import pickle

    g = torch.Generator().manual_seed(5)
    rows = [torch.randn(n, 6, generator=g) for n in (2, 3, 1, 4)]
    fp32 = [codec.encode(r, q, g) for r, q in zip(rows, (8, 3, 32, 5), strict=True)]
    fp16 = codec.encode(rows[0], 4, g, "fp16")
    for items in ([fp32[0], None, fp32[1], fp32[2], fp32[3]], [fp16, fp32[1], None, fp32[2], fp32[3]],
                  [None, fp32[2]]):
        back = pickle.loads(pickle.dumps(codec.EncodedList(items)))
        assert [e is None for e in back] == [e is None for e in items]
        for a, b in zip(items, back, strict=True):
            if a is not None:
                assert b.bits == a.bits and b.shape == a.shape and b.payload_bits == a.payload_bits
                assert (a.offset is None) == (b.offset is None)
                assert a.offset is None or a.offset.dtype == b.offset.dtype
                assert torch.equal(codec.decode(a), codec.decode(b))


def test_fp16_side_information_covers_the_fp16_range_and_no_more() -> None:
    """Rows reaching fp16's largest values (±65504) travel with fp16 side information; beyond, on either side,
    they are refused."""
    g = torch.Generator().manual_seed(6)
    ends = torch.tensor([[-65504.0, 0.0, 65504.0]])
    encoded = codec.encode(ends, 8, g, "fp16")
    assert float((codec.decode(encoded) - ends).abs().max()) <= float(encoded.scale[0])
    for beyond in (torch.tensor([[-70000.0, 0.0]]), torch.tensor([[0.0, 70000.0]])):
        with pytest.raises(CodecError, match="exceeds the fp16 side-information range"):
            codec.encode(beyond, 8, g, "fp16")


def test_fp16_side_information_is_the_tightest_cover_and_refuses_a_wider_step() -> None:
    """fp16 scale is the smallest fp16 value whose levels still reach each row's maximum (a step no wider than
    rounding requires); where fp16 rounding would widen the step past its slack (1.5x here, subnormal fp16) the
    codec refuses rather than break the variance bound."""
    g = torch.Generator().manual_seed(7)
    rows = _rows(7)
    for bits in (2, 4, 8):
        encoded = codec.encode(rows, bits, g, "fp16")
        levels = 2**bits - 1
        offset = torch.from_numpy(encoded.offset.astype(np.float32))
        scale = torch.from_numpy(encoded.scale)
        smaller = torch.nextafter(scale, torch.zeros_like(scale)).float()
        high = rows.max(dim=1).values
        assert bool((offset + scale.float() * levels >= high).all())
        assert bool((offset + smaller * levels < high).all())
    tiny = torch.linspace(0.0, 255 * 1.3 * 2.0**-24, 10)[None, :]  # ideal step 1.3 fp16 subnormal spacings
    with pytest.raises(CodecError, match="widen"):
        codec.encode(tiny, 8, g, "fp16")
