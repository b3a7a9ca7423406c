"""Leakage metrics: token accuracy and ROUGE-L for text, SSIM and PSNR for images, distance correlation."""

from __future__ import annotations

import math

import torch

SSIM_CHUNK = 64  # images per SSIM computation


def token_accuracy(predicted: torch.Tensor, truth: torch.Tensor, counted: torch.Tensor) -> float:
    """Share of the counted positions (real, non-special tokens) whose token id was recovered exactly."""
    counted = counted.bool()
    total = int(counted.sum())
    if total == 0:
        raise ValueError("no token to count: every position is padding or a special token")
    return float((predicted[counted] == truth[counted]).sum()) / total


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 of each reconstruction against its original (Lin 2004, Google's `rouge_score`)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return float(sum(scores) / len(scores))


def _as_images(images: torch.Tensor) -> torch.Tensor:
    """(N, h, w) or (N, C, h, w) as (N, C, h, w) float64."""
    images = images.detach().double()
    return images.unsqueeze(1) if images.dim() == 3 else images


def ssim(reconstructed: torch.Tensor, original: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean structural similarity (Wang et al. 2004) by torchmetrics with its defaults: a Gaussian window of
    sigma 1.5 (11 pixels), reflection padding at the borders (so 8x8 digits are measured too).

    In float32 and SSIM_CHUNK images at a time: torchmetrics' float64 convolution on the CPU takes seconds and
    gigabytes for a few hundred 98x98 images.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    preds, target = _as_images(reconstructed).float(), _as_images(original).float()
    values = []
    for start in range(0, preds.shape[0], SSIM_CHUNK):
        chunk = structural_similarity_index_measure(preds[start:start + SSIM_CHUNK], target[start:start + SSIM_CHUNK],
                                                    data_range=data_range, reduction="none")
        assert isinstance(chunk, torch.Tensor)
        values.append(chunk.double())
    return float(torch.cat(values).mean())


def psnr(reconstructed: torch.Tensor, original: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean per-image peak signal-to-noise ratio in dB (torchmetrics); inf when an image is recovered exactly."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    preds, target = _as_images(reconstructed), _as_images(original)
    values = peak_signal_noise_ratio(preds, target, data_range=data_range, reduction="none", dim=(1, 2, 3))
    value = float(values.mean())
    return math.inf if math.isinf(value) else value


def _double_centred(x: torch.Tensor) -> torch.Tensor:
    distances = torch.cdist(x, x)  # its gradient is finite at zero distance (the diagonal)
    return distances - distances.mean(0, keepdim=True) - distances.mean(1, keepdim=True) + distances.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Sample distance correlation dCor(X, Y) in [0, 1] of paired rows (Székely, Rizzo & Bakirov 2007).

    X is (n, ...), Y is (n, ...), each sample flattened. dCor = sqrt(dCov²(X, Y) / sqrt(dVar²(X) dVar²(Y)))
    with the V-statistics of the double-centred Euclidean distance matrices. Differentiable (NoPeek's
    loss, Vepakomma et al. 2020); 0 when X or Y is constant.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"paired samples needed: {x.shape[0]} rows of x, {y.shape[0]} of y")
    a = _double_centred(x.reshape(x.shape[0], -1).to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    b = _double_centred(y.reshape(y.shape[0], -1).to(a.dtype))
    dcov2 = (a * b).mean()
    dvar2 = (a * a).mean() * (b * b).mean()
    if float(dvar2.detach()) <= 0:
        return dcov2 * 0
    return (dcov2.clamp_min(0) / dvar2.sqrt()).clamp_min(eps).sqrt()
