"""The narrow interface of every attack: an input batch -> the smashed-data message the server sees."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sflam.platform import codec
from sflam.platform.split import DevicePart
from sflam.privacy.defences import clip_and_noise_packed, clip_packed

MESSAGE_CHUNK = 64  # samples per device-part forward when many messages are made (bounded memory)


@dataclass(frozen=True)
class ImageGeometry:
    """How an image becomes the device part's input and which smashed-data tokens are its patches."""

    size: int  # side of the model's input in pixels
    patch: int  # side of a patch in pixels
    first_patch: int  # index of the first patch token (after CLS, distillation and register tokens)
    mean: tuple[float, ...]  # the model's input normalisation, per channel
    std: tuple[float, ...]
    original_size: int  # side of the stored images (28 for MNIST, 8 for digits)

    @property
    def grid(self) -> int:
        return self.size // self.patch

    def to_input(self, grey: torch.Tensor) -> torch.Tensor:
        """Grey images (B, S, S) in [0, 1] as the model's input (B, C, S, S): copied to every channel, normalised."""
        mean = torch.tensor(self.mean, dtype=grey.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=grey.dtype).view(1, -1, 1, 1)
        return (grey.unsqueeze(1).expand(-1, len(self.mean), -1, -1) - mean) / std

    def to_grey(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model's input (B, C, S, S) back as grey images (B, S, S) in [0, 1] (the first channel)."""
        return pixels[:, 0] * self.std[0] + self.mean[0]

    def from_original(self, grey: torch.Tensor) -> torch.Tensor:
        """Grey images (B, s, s) at the original resolution resized to the model's (B, S, S), as the data pipeline
        does (`ImageData.pixels`: bilinear, no corner alignment); differentiable."""
        if self.size == self.original_size:
            return grey
        resized = nn.functional.interpolate(grey.unsqueeze(1), size=(self.size, self.size), mode="bilinear",
                                            align_corners=False)
        return resized.squeeze(1)

    def to_original(self, grey: torch.Tensor) -> torch.Tensor:
        """Grey images (B, S, S) at the original resolution (B, s, s): the least-squares inverse of the bilinear
        resize the data pipeline applies (separable, of full column rank when S >= s), so a perfect
        reconstruction of the model's input gives back the stored image exactly; clipped to [0, 1]."""
        if self.size == self.original_size:
            return grey.clamp(0, 1)
        basis = torch.eye(self.original_size, dtype=torch.float64)[None]
        resize = nn.functional.interpolate(basis, size=self.size, mode="linear", align_corners=False)[0].T
        inverse = torch.linalg.pinv(resize).to(grey.dtype)  # (s, S)
        return (inverse @ grey @ inverse.T).clamp(0, 1)


def word_embeddings(part: DevicePart) -> nn.Module:
    """The token-embedding layer of a text device part (BERT, Llama or GPT-2 family)."""
    if part.family == "bert":
        return part.embeddings.word_embeddings  # type: ignore[return-value,union-attr]
    if part.family == "llama":
        return part.embed_tokens  # type: ignore[return-value]
    if part.family == "gpt2":
        return part.wte  # type: ignore[return-value]
    raise ValueError(f"family {part.family} has no token embeddings")


class Target:
    """The device part as the attacked server knows it, and the messages it receives from it.

    `messages` is what crosses the link: the device part's forward (no gradients, the part left in
    train mode: bitsandbytes' 4-bit layers must never enter eval mode here, and our parts run without
    dropout), the codec at `bits` with a seeded stream, decoded, then the defence (each sample's whole
    message clipped to `clip_norm`, plus N(0, sigma² C²) per element). `forward` is the attacker's
    differentiable model of it (device part and clipping; the codec's rounding and the noise are random
    and not modelled); `forward_embeddings` runs a text part from input token embeddings.
    """

    def __init__(self, part: DevicePart, modality: str, bits: int, side_dtype: str = "fp32", clip_norm: float = 0.0,
                 noise_sigma: float = 0.0, seed: int = 0, pad_token_id: int = 0,
                 geometry: ImageGeometry | None = None) -> None:
        if modality not in ("text", "image"):
            raise ValueError(f"modality {modality!r}: text or image")
        if modality == "image" and geometry is None:
            raise ValueError("an image target needs its geometry")
        self.part = part
        self.modality = modality
        self.bits = bits
        self.side_dtype = side_dtype
        self.clip_norm = clip_norm
        self.noise_sigma = noise_sigma
        self.pad_token_id = pad_token_id
        self.geometry = geometry
        self.generator = torch.Generator().manual_seed(seed)
        for param in part.parameters():
            param.requires_grad_(False)  # the attacker differentiates through the part, never trains it

    @property
    def hidden_size(self) -> int:
        return int(self.part.config.hidden_size)

    # ------------------------------------------------------------------ what crosses the link
    @torch.no_grad()
    def messages(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The messages (B, T, H) the server receives for a batch, zeros at padding (never sent)."""
        out = []
        for start in range(0, inputs.shape[0], MESSAGE_CHUNK):
            chunk, chunk_mask = inputs[start:start + MESSAGE_CHUNK], mask[start:start + MESSAGE_CHUNK]
            hidden = self.part(chunk, chunk_mask).float()
            real = chunk_mask.bool()
            rows = codec.decode(codec.encode(hidden[real], self.bits, self.generator, self.side_dtype))
            rows = clip_and_noise_packed(rows, real.sum(1), self.clip_norm, self.noise_sigma, self.generator)
            full = torch.zeros_like(hidden)
            full[real] = rows
            out.append(full)
        return torch.cat(out)

    def noise_variance(self, messages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The expected per-element noise variance of every received row (B, T): the codec's stochastic rounding
        (Δ²/6 on average, Δ the row's step, read from the row's range) plus the defence's (σC)²."""
        rows = messages.float()
        span = rows.amax(-1) - rows.amin(-1)
        codec_variance = (span / (2**self.bits - 1)) ** 2 / 6 if self.bits != 32 else torch.zeros_like(span)
        return (codec_variance + (self.noise_sigma * self.clip_norm) ** 2) * mask.to(rows.dtype)

    # ------------------------------------------------------------------ the attacker's white-box model
    def _clipped(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        real = mask.bool()
        full = torch.zeros_like(hidden)
        full[real] = clip_packed(hidden[real], real.sum(1), self.clip_norm)
        return full

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The message without the codec's and the defence's randomness, differentiable in the inputs."""
        return self._clipped(self.part(inputs, mask).float(), mask)

    def forward_embeddings(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`forward` of a text part from input token embeddings (B, T, E) instead of token ids.

        The part runs unchanged on placeholder ids; a forward hook replaces its token-embedding layer's
        output by `embeddings`, so positions, token types, norms and blocks stay the part's own.
        """
        layer = word_embeddings(self.part)
        handle = layer.register_forward_hook(lambda _module, _args, _output: embeddings)
        try:
            placeholder = torch.full(mask.shape, self.pad_token_id, dtype=torch.long)
            return self.forward(placeholder, mask)
        finally:
            handle.remove()

    @torch.no_grad()
    def embedding_table(self) -> torch.Tensor:
        """The token-embedding matrix (V, E) as the part computes it (dequantized when stored in 4 or 8 bits)."""
        layer = word_embeddings(self.part)
        vocab = int(self.part.config.vocab_size)
        return torch.cat([layer(torch.arange(start, min(start + 8192, vocab))).float()
                          for start in range(0, vocab, 8192)])
