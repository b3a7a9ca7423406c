"""Defences of the smashed data as functions for the local step: per-sample clipping plus Gaussian noise, NoPeek.

How the training step uses them (docs/concepts/privacy.md; the wiring into `DeviceExecutor.forward` and the cohort
path is a separate change):

- Clipping and noise: a device's uplink message of one local step is the rows of its samples' real
  tokens, one sample after another (`hidden[mask]`, `lengths = mask.sum(1)`). Call
  `clip_and_noise_packed(rows, lengths, clip_norm, sigma, generator)` on them before the codec (or on
  the decoded rows, as `sflam attack` measures it). The guarantee of `sflam.privacy.accounting` holds in
  either order: noised before the codec, the codec is post-processing; clipped after it, the sensitivity
  bound 2C holds for every draw of the codec's rounding. The clipping is differentiable, so the activation
  gradient that comes back flows through it; the noise is additive and needs no gradient. Draw the noise
  from a seeded stream per transmission (as `codec_generator`), so both runtimes add the same noise.
- NoPeek: add `privacy.nopeek_weight * nopeek_loss(inputs, smashed, mask)` to the device's loss,
  its gradient with respect to the device adapter added to the one the server's activation gradient
  gives (`(hidden * grad).sum() + weight * nopeek_loss(...)`, then backward).
- Quantization bits are a defence knob already (`quant.activation_bits`, the allocator's bits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sflam.privacy.metrics import distance_correlation


def sample_norms(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each sample's whole message: its `lengths[i]` rows of `rows`, in turn."""
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=rows.device), lengths.to(rows.device))
    squares = torch.zeros(len(lengths), dtype=rows.dtype, device=rows.device)
    squares = squares.index_add(0, owner, rows.pow(2).sum(-1))
    return squares.sqrt()


def clip_packed(rows: torch.Tensor, lengths: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Each sample's rows scaled by min(1, C / ||sample||): every sample's message has norm <= C; differentiable.

    `clip_norm` 0 leaves the rows as they are (no clipping).
    """
    if clip_norm <= 0:
        return rows
    norms = sample_norms(rows, lengths)
    factor = clip_norm / torch.maximum(norms, torch.full_like(norms, clip_norm))
    return rows * torch.repeat_interleave(factor, lengths.to(rows.device), dim=0)[:, None]


def clip_and_noise_packed(rows: torch.Tensor, lengths: torch.Tensor, clip_norm: float, sigma: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample clipping of a device's packed message to norm C, then N(0, sigma² C²) added to every element.

    rows: (sum(lengths), H), the samples' rows one sample after another; lengths: rows per sample. The
    noise is drawn on the CPU from `generator` (in row order), so it is the same wherever the rows live.
    sigma 0 adds no noise; sigma > 0 needs clip_norm > 0 (the noise scale is sigma * C).
    """
    if int(lengths.sum()) != rows.shape[0]:
        raise ValueError(f"lengths sum to {int(lengths.sum())} rows, the message has {rows.shape[0]}")
    clipped = clip_packed(rows, lengths, clip_norm)
    if sigma <= 0:
        return clipped
    if clip_norm <= 0:
        raise ValueError("Gaussian noise needs a clip norm C > 0: its standard deviation is sigma * C")
    noise = torch.randn(tuple(rows.shape), generator=generator, dtype=torch.float32)
    return clipped + (sigma * clip_norm) * noise.to(device=rows.device, dtype=rows.dtype)


def clip_and_noise(rows_per_sample: Sequence[torch.Tensor], clip_norm: float, sigma: float,
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """`clip_and_noise_packed` of samples given one by one: each (T_i, H) sample's message, clipped and noised."""
    if not rows_per_sample:
        return []
    lengths = torch.tensor([int(r.shape[0]) for r in rows_per_sample])
    out = clip_and_noise_packed(torch.cat(list(rows_per_sample)), lengths, clip_norm, sigma, generator)
    return list(torch.split(out, lengths.tolist()))


def nopeek_loss(inputs: torch.Tensor, smashed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """NoPeek's leakage term: the distance correlation between a batch's inputs and its smashed data.

    inputs: (B, ...) floats, each sample flattened: the pixels for images; for text the input token
    embeddings (B, T, H) (token ids are not a metric space). smashed: (B, T, H). With a mask (B, T) the
    padding positions of both (when they have a T axis) are zeroed, so padding never counts as signal.
    The caller weights it (`privacy.nopeek_weight`) and adds it to the device's loss (Vepakomma et al.,
    "NoPeek: Information leakage reduction to share activations in distributed deep learning", 2020).
    """
    if mask is not None:
        keep = mask.to(smashed.dtype)
        smashed = smashed * keep[..., None]
        if inputs.dim() == 3 and inputs.shape[:2] == mask.shape:
            inputs = inputs * keep[..., None].to(inputs.dtype)
    return distance_correlation(inputs.float(), smashed.float())
