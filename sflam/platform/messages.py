"""What crosses the link in a local step: each device's smashed-data message and the stochastic-rounding stream
of every transmission (the same in every runtime), and how many messages cross processes as a few arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sflam.platform import codec
from sflam.platform.codec import Encoded

# the transmissions of a local step, each with its own stochastic-rounding stream: smashed data up, its gradient
# down; in a U-shaped split also the server part's features down and their gradient up
UPLINK, DOWNLINK, FEATURES_DOWN, FEATURE_GRADIENTS_UP = 0, 1, 2, 3
NOISE = 4  # the stream of a noise defence's draws on a device's smashed data
HEADER_BITS_PER_SAMPLE = 32  # sequence length (16) and label (16) travel with the smashed data
U_HEADER_BITS_PER_SAMPLE = 16  # a U-shaped split sends no label: the sequence length alone


def codec_generator(seed: int, round_index: int, step: int, device: int, direction: int) -> torch.Generator:
    """The stochastic-rounding stream of one transmission, the same in every runtime."""
    state = np.random.SeedSequence([seed, round_index, step, device + 3, direction]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class Smashed:
    """One device's uplink message of a local step: encoded activations of its real tokens, the hidden states at the
    device's cut layer (None: the server part's own cut)."""

    device: int
    activations: Encoded
    attention_mask: torch.Tensor
    labels: torch.Tensor
    cut: int | None = None

    @property
    def payload_bits(self) -> int:
        header = HEADER_BITS_PER_SAMPLE if self.labels.numel() else U_HEADER_BITS_PER_SAMPLE
        return self.activations.payload_bits + header * int(self.attention_mask.shape[0])


class Messages(list):  # type: ignore[type-arg]
    """One process's smashed messages of a step, crossing processes as a few arrays (one object per worker and
    step: thousands of small messages pickle one by one far more slowly). Unpickled, the same list."""

    def __reduce__(self) -> tuple[Any, ...]:
        masks = [m.attention_mask for m in self]
        labels = [m.labels for m in self]
        encoded = codec.pack_many([m.activations for m in self])
        if (encoded is None or len({t.dtype for t in masks}) > 1 or len({t.dtype for t in labels}) > 1
                or any(t.requires_grad for t in masks + labels)):
            return (list, (list(self),))
        mask_flat = torch.cat([t.reshape(-1) for t in masks]).numpy() if masks else np.zeros(0, np.int64)
        label_flat = torch.cat([t.reshape(-1) for t in labels]).numpy() if labels else np.zeros(0, np.int64)
        shapes = [(tuple(a.shape), tuple(b.shape)) for a, b in zip(masks, labels, strict=True)]
        return (_messages, ([m.device for m in self], encoded, mask_flat, label_flat, shapes, [m.cut for m in self]))


def _messages(devices: list[int], encoded: tuple[Any, ...], mask_flat: np.ndarray, label_flat: np.ndarray,
              shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], cuts: list[int | None] | None = None
              ) -> Messages:
    masks, labels = torch.from_numpy(mask_flat.copy()), torch.from_numpy(label_flat.copy())
    out = Messages()
    a = b = 0
    cuts = cuts if cuts is not None else [None] * len(devices)
    for device, activations, (mask_shape, label_shape), cut in zip(devices, codec.unpack_many(encoded), shapes, cuts,
                                                                   strict=True):
        m, n = int(np.prod(mask_shape)), int(np.prod(label_shape))
        out.append(Smashed(device, activations, masks[a:a + m].view(mask_shape),  # type: ignore[arg-type]
                           labels[b:b + n].view(label_shape), cut))
        a, b = a + m, b + n
    return out


def real_rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of the real tokens (mask 1), sample after sample: what the codec encodes."""
    return hidden[mask.bool()]


def scatter_rows(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inverse of `real_rows`: rows back into a zero-padded (batch, length, hidden) tensor."""
    full = torch.zeros((*mask.shape, rows.shape[-1]), dtype=rows.dtype, device=rows.device)
    full[mask.bool()] = rows
    return full
