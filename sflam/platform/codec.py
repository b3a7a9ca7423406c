"""Smashed-data codec: stochastic uniform q-bit quantization per row, values packed into bytes
(docs/concepts/split-and-codec.md).

Each row (one token's activation or activation-gradient vector) gets an offset and a scale stored in
fp32 or fp16; values become integer levels in [0, 2^q - 1] by stochastic rounding, which makes the
decoder unbiased, E[Q(x)] = x, with per-element variance at most Δ²/4, Δ = scale = range/(2^q - 1).
q = 32 sends raw fp32. The payload size in bits is exact: packed values plus side information.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sflam.platform.errors import CodecError

SIDE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Activation gradients of a mean loss over many devices are ~1e-6 and smaller, where fp16 side
# information underflows and widens the step: they always travel with fp32 side information.
GRADIENT_SIDE_DTYPE = "fp32"
FP16_STEP_SLACK = 2.0**-9  # normal fp16 rounding of scale and offset widens the step by less than this


@dataclass(frozen=True)
class Encoded:
    """One encoded tensor as it travels: packed levels, per-row offset and scale, and its shape."""

    bits: int
    shape: tuple[int, ...]
    packed: np.ndarray  # uint8
    offset: np.ndarray | None  # per row, side dtype
    scale: np.ndarray | None

    @property
    def payload_bits(self) -> int:
        """Exact size on the wire: packed values + side information."""
        side = 0 if self.offset is None else self.offset.nbytes + self.scale.nbytes  # type: ignore[union-attr]
        return 8 * (self.packed.nbytes + side)


def payload_bits(num_rows: int, row_size: int, bits: int, side_dtype: str = "fp32") -> int:
    """The payload of `num_rows` rows of `row_size` values at `bits` bits, without encoding anything."""
    if bits == 32:
        return 32 * num_rows * row_size
    side_bits = 2 * (32 if side_dtype == "fp32" else 16) * num_rows
    return 8 * ((num_rows * row_size * bits + 7) // 8) + side_bits


def _pack(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned levels (< 2^bits) into a byte string, `bits` bits each, little-endian bit order."""
    flat = levels.reshape(-1)
    if bits == 8:
        return flat.astype(np.uint8)
    if bits == 16:
        return flat.astype("<u2").view(np.uint8)
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        padded = np.zeros(-(-flat.size // per_byte) * per_byte, dtype=np.uint8)
        padded[: flat.size] = flat
        grouped = padded.reshape(-1, per_byte)
        out = np.zeros(grouped.shape[0], dtype=np.uint8)
        for slot in range(per_byte):
            out |= grouped[:, slot] << (slot * bits)
        return out
    bit_planes = ((flat[:, None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bit_planes.reshape(-1), bitorder="little")


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[:count].astype(np.int64)
    if bits == 16:
        return packed.view("<u2")[:count].astype(np.int64)
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        slots = [(packed >> (slot * bits)) & mask for slot in range(per_byte)]
        return np.stack(slots, axis=1).reshape(-1)[:count].astype(np.int64)
    bit_planes = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits).astype(np.int64)
    return (bit_planes << np.arange(bits, dtype=np.int64)).sum(axis=1)


def _side_range(rows: torch.Tensor, bits: int, side: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Offset and scale already rounded to the side dtype, covering every row's [min, max]."""
    low = rows.min(dim=1).values
    high = rows.max(dim=1).values
    levels = float(2**bits - 1)
    if side == torch.float32:
        return low, (high - low) / levels
    finfo = torch.finfo(side)
    if bool((low < finfo.min).any()) or bool((high > finfo.max).any()):
        raise CodecError(f"smashed data exceeds the fp16 side-information range (|x| > {finfo.max:g}); "
                         "use quant.side_dtype=fp32")
    offset = low.to(side)
    offset = torch.where(offset.float() > low, torch.nextafter(offset, torch.full_like(offset, -float("inf"))),
                         offset)
    scale = ((high - offset.float()) / levels).to(side)
    too_small = offset.float() + scale.float() * levels < high
    scale = torch.where(too_small, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    ideal = (high - low) / levels
    wide = scale.float() > ideal * (1 + FP16_STEP_SLACK) + torch.finfo(torch.float32).tiny
    if bool(wide.any()):  # subnormal fp16 side information: the step would no longer meet the bound
        worst = float((scale.float()[wide] / ideal[wide].clamp_min(torch.finfo(torch.float32).tiny)).max())
        raise CodecError(f"fp16 side information would widen the quantization step {worst:.3g}x for rows of range "
                         f"{float(ideal[wide].min() * levels):.3g} (fp16 underflow); use quant.side_dtype=fp32")
    return offset.float(), scale.float()


def _checked(x: torch.Tensor, bits: list[int], side_dtype: str) -> torch.Tensor:
    """`x` as fp32 once the bit widths, the side dtype and its values are valid (one line naming what is not)."""
    for q in sorted(set(bits)):
        if not (q == 32 or 1 <= q <= 16):
            raise CodecError(f"bits={q} is invalid: allowed are 1..16, or 32 for raw fp32")
    if side_dtype not in SIDE_DTYPES:
        raise CodecError(f"side_dtype={side_dtype!r} is invalid: allowed are fp32, fp16")
    data = x.detach().float()
    if not bool(torch.isfinite(data).all()):
        bad = int((~torch.isfinite(data)).sum())
        raise CodecError(f"smashed data holds {bad} non-finite value(s) (NaN or inf); refusing to send them")
    return data


def encode(x: torch.Tensor, bits: int, generator: torch.Generator | None = None, side_dtype: str = "fp32"
           ) -> Encoded:
    """Encode a tensor whose last dimension is a row; stochastic rounding draws from `generator`."""
    data = _checked(x, [bits], side_dtype)
    shape = tuple(data.shape)
    if bits == 32:
        return Encoded(32, shape, data.contiguous().numpy().view(np.uint8).reshape(-1).copy(), None, None)
    rows = data.reshape(-1, shape[-1]) if data.dim() > 0 and shape[-1] > 0 else data.reshape(-1, 1)
    side = SIDE_DTYPES[side_dtype]
    offset, scale = _side_range(rows, bits, side)
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    position = (rows - offset[:, None]) / safe_scale[:, None]
    noise = torch.rand(position.shape, generator=generator, dtype=position.dtype)
    levels = torch.floor(position + noise).clamp_(0, 2**bits - 1)
    levels = torch.where(scale[:, None] > 0, levels, torch.zeros_like(levels))
    packed = _pack(levels.to(torch.int64).numpy(), bits)
    np_side = np.float32 if side_dtype == "fp32" else np.float16
    return Encoded(bits, shape, packed, offset.numpy().astype(np_side), scale.numpy().astype(np_side))


def decode(encoded: Encoded) -> torch.Tensor:
    """Reconstruct the fp32 tensor: offset + level * scale per row."""
    count = int(np.prod(encoded.shape)) if encoded.shape else 1
    if encoded.bits == 32:
        return torch.from_numpy(encoded.packed.view(np.float32).copy()).reshape(encoded.shape)
    levels = torch.from_numpy(_unpack(encoded.packed, encoded.bits, count)).float()
    offset = torch.from_numpy(encoded.offset.astype(np.float32))  # type: ignore[union-attr]
    scale = torch.from_numpy(encoded.scale.astype(np.float32))  # type: ignore[union-attr]
    rows = levels.reshape(offset.shape[0], -1) * scale[:, None] + offset[:, None]
    return rows.reshape(encoded.shape)


def step_size(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Δ per row: the quantization step the variance bound Δ²/4 refers to (fp32 side information)."""
    rows = x.detach().float().reshape(-1, x.shape[-1])
    return (rows.max(dim=1).values - rows.min(dim=1).values) / float(2**bits - 1)


def encode_many(rows: torch.Tensor, counts: list[int], bits: list[int], generators: list[torch.Generator],
                side_dtype: str = "fp32") -> list[Encoded]:
    """`encode` of many devices' rows at once: `rows` holds each device's rows in turn (`counts` of them), each
    device at its own bits with its own generator. Row statistics and rounding run once per bit width; only the
    noise is drawn device by device, from each device's stream, so every result equals `encode` of its rows."""
    data = _checked(rows, bits, side_dtype)
    width = int(data.shape[-1])
    pieces = torch.split(data, counts)
    out: list[Encoded | None] = [None] * len(counts)
    np_side = np.float32 if side_dtype == "fp32" else np.float16
    for q in sorted(set(bits)):
        members = [i for i, b in enumerate(bits) if b == q]
        if q == 32:
            for i in members:
                raw = pieces[i].contiguous().numpy().view(np.uint8).reshape(-1).copy()
                out[i] = Encoded(32, (counts[i], width), raw, None, None)
            continue
        group = data if len(members) == len(counts) else torch.cat([pieces[i] for i in members])
        offset, scale = _side_range(group, q, SIDE_DTYPES[side_dtype])
        safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        # in place, one buffer: thousands of devices' rows are hundreds of MiB (the same operations as `encode`)
        levels = torch.empty_like(group)
        at = 0
        for i in members:  # each device's noise from its own stream: what torch.rand draws, written in place
            levels[at:at + counts[i]].uniform_(generator=generators[i])
            at += counts[i]
        levels.add_((group - offset[:, None]).div_(safe_scale[:, None])).floor_().clamp_(0, 2**q - 1)
        levels.masked_fill_(~(scale[:, None] > 0), 0)
        level_values = levels.to(torch.uint8 if q <= 8 else torch.int32).numpy()
        offsets, scales = offset.numpy().astype(np_side), scale.numpy().astype(np_side)
        member_rows = [counts[i] for i in members]
        bounds = np.concatenate([[0], np.cumsum(member_rows)])
        if all(n * width * q % 8 == 0 for n in member_rows):  # whole bytes per device: pack once, split the bytes
            packed = _pack(level_values, q)
            byte_bounds = bounds * width * q // 8
            chunks = [packed[byte_bounds[j]:byte_bounds[j + 1]] for j in range(len(members))]
        else:
            chunks = [_pack(level_values[bounds[j]:bounds[j + 1]], q) for j in range(len(members))]
        for j, i in enumerate(members):
            out[i] = Encoded(q, (counts[i], width), chunks[j], offsets[bounds[j]:bounds[j + 1]],
                             scales[bounds[j]:bounds[j + 1]])
    return [e for e in out if e is not None]


def decode_many(encoded: list[Encoded]) -> torch.Tensor:
    """The decoded rows of many encoded tensors of the same row size, one after another (as `decode` of each)."""
    if encoded and all(e.bits == encoded[0].bits != 32 for e in encoded) and all(
            int(np.prod(e.shape)) * e.bits % 8 == 0 for e in encoded):
        bits, width = encoded[0].bits, encoded[0].shape[-1]
        count = sum(int(np.prod(e.shape)) for e in encoded)
        levels = torch.from_numpy(_unpack(np.concatenate([e.packed for e in encoded]), bits, count)).float()
        offset = torch.from_numpy(np.concatenate([e.offset for e in encoded]).astype(np.float32))  # type: ignore[misc]
        scale = torch.from_numpy(np.concatenate([e.scale for e in encoded]).astype(np.float32))  # type: ignore[misc]
        return (levels.reshape(offset.shape[0], -1) * scale[:, None] + offset[:, None]).reshape(-1, width)
    return torch.cat([decode(e).reshape(-1, e.shape[-1]) for e in encoded])


def _joined(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of one dtype as one array and the bounds of each."""
    bounds = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int64)
    return (np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.uint8)), bounds


def pack_many(items: list[Encoded | None]) -> tuple[Any, ...] | None:
    """Many encoded tensors as a few arrays (None: they differ in side dtype and travel as they are)."""
    present = [e for e in items if e is not None]
    sides = {e.offset.dtype for e in present if e.offset is not None}
    if len(sides) > 1:
        return None
    packed, packed_bounds = _joined([e.packed for e in present])
    with_side = [e for e in present if e.offset is not None]
    offsets, side_bounds = _joined([e.offset for e in with_side])  # type: ignore[misc]
    scales, _ = _joined([e.scale for e in with_side])  # type: ignore[misc]
    flags = [None if e is None else (e.bits, e.shape, e.offset is not None) for e in items]
    return flags, packed, packed_bounds, offsets, scales, side_bounds


def unpack_many(fields: tuple[Any, ...]) -> list[Encoded | None]:
    """The inverse of `pack_many`: each tensor's arrays are views of the shared ones (copied once, writable)."""
    flags, packed, packed_bounds, offsets, scales, side_bounds = fields
    packed, offsets, scales = packed.copy(), offsets.copy(), scales.copy()
    out: list[Encoded | None] = []
    j = s = 0
    for flag in flags:
        if flag is None:
            out.append(None)
            continue
        bits, shape, has_side = flag
        body = packed[packed_bounds[j]:packed_bounds[j + 1]]
        j += 1
        if has_side:
            a, b = side_bounds[s], side_bounds[s + 1]
            out.append(Encoded(bits, shape, body, offsets[a:b], scales[a:b]))
            s += 1
        else:
            out.append(Encoded(bits, shape, body, None, None))
    return out


class EncodedList(list):  # type: ignore[type-arg]
    """A list of encoded tensors (or None) that crosses processes as a few arrays: thousands of small objects
    pickle one by one far more slowly. Unpickled, it is the same list, value for value."""

    def __reduce__(self) -> tuple[Any, ...]:
        fields = pack_many(list(self))
        return (list, (list(self),)) if fields is None else (_encoded_list, (fields,))


def _encoded_list(fields: tuple[Any, ...]) -> EncodedList:
    return EncodedList(unpack_many(fields))
