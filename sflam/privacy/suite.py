"""The attack registry and the suite: intercept the victims' messages once, run every attack, score each alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from sflam.platform.config import PRIVACY_ATTACKS, PrivacyConfig
from sflam.platform.data import ImageData, TokenizedData, collate
from sflam.privacy.attack import Attack, Auxiliary, Intercepted
from sflam.privacy.build import AttackSetup
from sflam.privacy.inverse import InverseModel
from sflam.privacy.linear import LinearInversion
from sflam.privacy.metrics import psnr, rouge_l, ssim, token_accuracy
from sflam.privacy.target import MESSAGE_CHUNK, Target
from sflam.privacy.whitebox import WhiteBoxInversion

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (LinearInversion, InverseModel, WhiteBoxInversion)}
assert tuple(ATTACKS) == PRIVACY_ATTACKS, "the config's attack names are the registry's"
# the metric that ranks attacks per modality (higher leaks more)
HEADLINE = {"text": "token_accuracy", "image": "ssim"}


@dataclass
class AttackResult:
    """One attack's leakage on the victims, its budget and its wall time."""

    name: str
    description: str
    metrics: dict[str, float]
    budgets: dict[str, int]
    wall_s: float
    reconstruction: torch.Tensor  # token ids (B, T) or grey images (B, S, S) at the model's input size


@dataclass
class SuiteResult:
    """Every attack's result on the same intercepted messages, with what they are scored against."""

    modality: str
    results: list[AttackResult]
    truth: torch.Tensor  # the victims' token ids (B, T) or grey images (B, S, S) at the model's input size
    mask: torch.Tensor
    intercept_s: float  # making the auxiliary set's and the victims' messages
    info: dict[str, float] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        return HEADLINE[self.modality]

    def best(self, metric: str | None = None) -> AttackResult:
        """The attack that leaks most by `metric` (the modality's headline metric by default)."""
        key = metric or self.headline
        return max(self.results, key=lambda r: r.metrics[key])


def collect(target: Target, data: TokenizedData | ImageData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, mask, messages) of every sample: inputs are token ids (N, T), or grey images (N, S, S) at the
    model's input size; messages (N, T, H) as the server receives them."""
    inputs, masks, messages = [], [], []
    for start in range(0, len(data), MESSAGE_CHUNK):
        batch = collate(data, np.arange(start, min(start + MESSAGE_CHUNK, len(data))), target.pad_token_id)
        masks.append(batch.attention_mask)
        messages.append(target.messages(batch.input_ids, batch.attention_mask))
        if target.geometry is not None:
            inputs.append(target.geometry.to_grey(batch.input_ids))
        else:
            inputs.append(batch.input_ids)
    if target.modality == "image":
        return torch.cat(inputs), torch.cat(masks), torch.cat(messages)
    length = max(int(m.shape[1]) for m in masks)

    def pad(tensors: list[torch.Tensor], value: float) -> torch.Tensor:  # right padding of the T axis
        return torch.cat([torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, length - int(t.shape[1])),
                                                  value=value) for t in tensors])

    return pad(inputs, target.pad_token_id), pad(masks, 0), pad(messages, 0.0)


def auxiliary(target: Target, data: TokenizedData | ImageData) -> Auxiliary:
    inputs, mask, messages = collect(target, data)
    if target.modality == "text":
        real = mask.bool()
        return Auxiliary(messages[real], inputs[real])
    return Auxiliary(messages, inputs)


def evaluate_text(predicted: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor, special_ids: frozenset[int],
                  tokenizer) -> dict[str, float]:
    """Token accuracy and ROUGE-L F1 of the decoded sentences, both over the same positions: the real tokens that
    are not special ones ([CLS], [SEP], padding: the tokenizer's conventions, known to anyone)."""
    counted = counted_positions(truth, mask, special_ids)
    texts = decode(tokenizer, truth, counted)
    guesses = decode(tokenizer, predicted, counted)
    return {"token_accuracy": token_accuracy(predicted, truth, counted), "rouge_l": rouge_l(guesses, texts)}


def counted_positions(truth: torch.Tensor, mask: torch.Tensor, special_ids: frozenset[int]) -> torch.Tensor:
    """The positions leakage is counted on: real tokens that are not special tokens."""
    return mask.bool() & ~torch.isin(truth, torch.tensor(sorted(special_ids), dtype=truth.dtype))


def decode(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Each sequence's positions where `mask` is set, as text (special tokens skipped)."""
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(ids, mask, strict=True)]


def evaluate_images(reconstructed: torch.Tensor, truth: torch.Tensor, target: Target) -> dict[str, float]:
    """SSIM and PSNR at the model's input size and at the original resolution (data range 1)."""
    geometry = target.geometry
    assert geometry is not None
    small, original = geometry.to_original(reconstructed), geometry.to_original(truth)
    return {"ssim": ssim(reconstructed, truth), "psnr_db": psnr(reconstructed, truth),
            "ssim_original": ssim(small, original), "psnr_original_db": psnr(small, original)}


def run_suite(setup: AttackSetup, config: PrivacyConfig, progress: bool = False,
              announce: Callable[[str], None] | None = None) -> SuiteResult:
    """Intercept the victims' messages and make the auxiliary set's, then run and score every configured attack."""
    target = setup.target
    started = time.perf_counter()
    truth, mask, messages = collect(target, setup.victims)
    intercepted = Intercepted(messages, mask)
    aux = auxiliary(target, setup.aux)
    intercept_s = time.perf_counter() - started
    # the scale a clip norm C compares with: each victim's whole message, as received
    info: dict[str, float] = {"median_message_norm": float(messages.flatten(1).norm(dim=1).median())}
    if target.modality == "text":
        counted = counted_positions(truth, mask, setup.special_ids)
        info["victim_tokens_in_aux"] = float(torch.isin(truth[counted], aux.inputs).double().mean())
        info["victim_tokens"] = float(counted.sum())
    results = []
    for name in config.attacks:
        attack = ATTACKS[name](config, progress=progress)
        if announce is not None:
            announce(f"{name}: {attack.description}")
        started = time.perf_counter()
        reconstruction = attack.reconstruct(target, aux, intercepted, config.seed)
        wall_s = time.perf_counter() - started
        if target.modality == "text":
            metrics = evaluate_text(reconstruction, truth, mask, setup.special_ids, setup.tokenizer)
        else:
            metrics = evaluate_images(reconstruction, truth, target)
        results.append(AttackResult(name, attack.description, metrics, attack.budgets(target.modality), wall_s,
                                    reconstruction))
    return SuiteResult(target.modality, results, truth, mask, intercept_s, info)
