"""Learning-based inversion: an inverse model trained on auxiliary data passed through the current target.

The learning stage of BiSR (Chen et al., "Unveiling the vulnerability of private fine-tuning in split-
based frameworks for large language models: a bidirectionally enhanced attack", CCS 2024) and of
FORA-style inverse networks (Xu et al., CVPR 2024), our own small models:

- text: each received token vector -> its token id, by an MLP whose output layer starts from the
  token embeddings (known white-box) of the ids the auxiliary data holds. A transformer over the
  sequence did not pay here: at the cuts we measured, each position's vector alone carries its token.
- images: the patch tokens -> the image, the least-squares inversion of `linear` plus a learned
  correction (a token MLP and one self-attention layer over the patches, output layer started at zero),
  so training starts from the baseline and fits what is not linear (deeper cuts, quantization); of
  the snapshots the one with the highest SSIM on held-out auxiliary images is kept.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sflam.privacy.attack import Attack, Auxiliary, Intercepted
from sflam.privacy.linear import PatchInverse, fit_patch_inverse, from_patches, patch_tokens, split
from sflam.privacy.metrics import ssim
from sflam.privacy.target import ImageGeometry, Target

TEXT_BATCH = 256  # token rows per training step
IMAGE_BATCH = 32  # images per training step
TEXT_LR, IMAGE_LR = 2e-3, 1e-3
DECODER_WIDTH = 256
SNAPSHOTS = 10  # held-out checks of the image decoder over its training


class TokenDecoder(nn.Module):
    """A received token vector -> scores over the candidate token ids (LayerNorm, MLP, embedding-started head)."""

    def __init__(self, hidden: int, candidate_embeddings: torch.Tensor) -> None:
        super().__init__()
        width = candidate_embeddings.shape[1]
        self.body = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                  nn.Linear(2 * hidden, width))
        self.head = nn.Linear(width, candidate_embeddings.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(candidate_embeddings)
            self.head.bias.zero_()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(rows))


class ImageDecoder(nn.Module):
    """Patch tokens -> patch pixels: a fixed least-squares inversion plus a learned, zero-started correction."""

    def __init__(self, hidden: int, linear: PatchInverse, width: int = DECODER_WIDTH) -> None:
        super().__init__()
        geometry = linear.geometry
        self.geometry = geometry
        self.register_buffer("token_mean", linear.token_mean.float())
        self.register_buffer("weight", linear.weight.float())
        self.register_buffer("pixel_mean", linear.pixel_mean.float())
        self.norm = nn.LayerNorm(hidden)
        self.embed = nn.Linear(hidden, width)
        self.position = nn.Parameter(torch.zeros(geometry.grid**2, width))
        self.mix = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0,
                                              batch_first=True, norm_first=True)
        self.out = nn.Linear(width, geometry.patch**2)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    token_mean: torch.Tensor
    weight: torch.Tensor
    pixel_mean: torch.Tensor

    def forward(self, messages: torch.Tensor) -> torch.Tensor:
        tokens = patch_tokens(messages, self.geometry).float()
        base = (tokens - self.token_mean) @ self.weight + self.pixel_mean
        correction = self.out(self.mix(self.embed(self.norm(tokens)) + self.position))
        return from_patches(base + correction, self.geometry)


def train_token_decoder(target: Target, aux: Auxiliary, steps: int, seed: int, progress: Attack) -> tuple[
        TokenDecoder, torch.Tensor]:
    """The text inverse model, fitted with cross-entropy on the auxiliary rows; returns it and its candidate ids."""
    candidates, classes = torch.unique(aux.inputs, return_inverse=True)
    table = target.embedding_table()
    torch.manual_seed(seed)
    model = TokenDecoder(aux.messages.shape[1], table[candidates])
    optimizer = torch.optim.Adam(model.parameters(), lr=TEXT_LR)
    draws = torch.Generator().manual_seed(seed)
    for _ in progress.steps(range(steps), steps, "training the inverse model"):
        batch = torch.randint(0, len(classes), (TEXT_BATCH,), generator=draws)
        loss = nn.functional.cross_entropy(model(aux.messages[batch]), classes[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, candidates


def train_image_decoder(geometry: ImageGeometry, aux: Auxiliary, steps: int, seed: int, progress: Attack
                        ) -> ImageDecoder:
    """The image inverse model, fitted with the mean squared pixel error on nine tenths of the auxiliary images;
    the snapshot with the highest SSIM on the other tenth is kept (the start, the linear inversion, included)."""
    torch.manual_seed(seed)
    model = ImageDecoder(aux.messages.shape[-1], fit_patch_inverse(aux, geometry, seed))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=IMAGE_LR)
    train, held = split(len(aux.inputs), seed)
    draws = torch.Generator().manual_seed(seed)

    def held_score() -> float:  # the leakage measured, not the loss: a lower squared error can blur structure
        with torch.no_grad():
            return ssim(model(aux.messages[held]).clamp(0, 1), aux.inputs[held])

    best_score, best_state = held_score(), copy.deepcopy(model.state_dict())
    check_every = max(1, steps // SNAPSHOTS)
    for step in progress.steps(range(1, steps + 1), steps, "training the inverse model"):
        batch = train[torch.randint(0, len(train), (IMAGE_BATCH,), generator=draws)]
        loss = (model(aux.messages[batch]) - aux.inputs[batch]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % check_every == 0 or step == steps:
            score = held_score()
            if score > best_score:
                best_score, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model


class InverseModel(Attack):
    name = "inverse-model"
    description = "learning-based: an inverse network trained on auxiliary data through the target"

    def budgets(self, modality: str) -> dict[str, int]:
        batch = TEXT_BATCH if modality == "text" else IMAGE_BATCH
        return {**super().budgets(modality), "inverse_steps": self.config.inverse_steps, "batch": batch}

    def reconstruct(self, target: Target, aux: Auxiliary, intercepted: Intercepted, seed: int) -> torch.Tensor:
        steps = self.config.inverse_steps
        with torch.enable_grad():
            if target.modality == "text":
                model, candidates = train_token_decoder(target, aux, steps, seed, self)
            else:
                assert target.geometry is not None
                image_model = train_image_decoder(target.geometry, aux, steps, seed, self)
        with torch.no_grad():
            if target.modality == "text":
                out = torch.full(intercepted.mask.shape, target.pad_token_id, dtype=torch.long)
                real = intercepted.mask.bool()
                out[real] = candidates[model(intercepted.messages[real]).argmax(-1)]
                return out
            return image_model(intercepted.messages).clamp(0, 1)
