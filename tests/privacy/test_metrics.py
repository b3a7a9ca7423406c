"""Leakage metrics against values computed independently: exact cases, hand-computed LCS, an O(n²) dCor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sflam.privacy.metrics import distance_correlation, psnr, rouge_l, ssim, token_accuracy


def test_identical_images_have_ssim_one_and_infinite_psnr() -> None:
    images = torch.rand(4, 28, 28, generator=torch.Generator().manual_seed(0))
    assert ssim(images, images) == pytest.approx(1.0, abs=1e-12)
    assert psnr(images, images) == math.inf
    small = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))  # smaller than the 11-pixel window
    assert ssim(small, small) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_error() -> None:
    images = torch.full((2, 16, 16), 0.25)
    # every pixel off by 0.1: MSE 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB
    assert psnr(images + 0.1, images) == pytest.approx(20.0, abs=1e-6)
    assert ssim(torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(2)), images) < 0.1


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_matches_a_longest_common_subsequence_by_hand() -> None:
    pairs = [("the cat sat on the mat", "the cat lay on a mat"),  # LCS the cat on mat: 4 of 6 and 6
             ("a b c d e", "e d c b a"),  # LCS 1
             ("an entirely different sentence", "nothing in common here"),
             ("same words here", "same words here")]
    expected = []
    for guess, reference in pairs:
        g, r = guess.split(), reference.split()
        common = _lcs(g, r)
        precision, recall = common / len(g), common / len(r)
        expected.append(0.0 if common == 0 else 2 * precision * recall / (precision + recall))
    assert expected[0] == pytest.approx(4 / 6)
    for (guess, reference), value in zip(pairs, expected, strict=True):
        assert rouge_l([guess], [reference]) == pytest.approx(value)
    assert rouge_l([g for g, _ in pairs], [r for _, r in pairs]) == pytest.approx(float(np.mean(expected)))


def test_token_accuracy_counts_only_the_counted_positions() -> None:
    truth = torch.tensor([[101, 5, 6, 7, 102, 0], [101, 8, 9, 102, 0, 0]])
    guess = torch.tensor([[0, 5, 1, 7, 0, 0], [101, 8, 9, 0, 3, 3]])
    counted = (truth != 0) & (truth != 101) & (truth != 102)
    assert token_accuracy(guess, truth, counted) == pytest.approx(4 / 5)
    with pytest.raises(ValueError):
        token_accuracy(guess, truth, torch.zeros_like(counted))


def _dcor_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Székely's sample distance correlation, written out element by element."""
    n = len(x)

    def centred(z: np.ndarray) -> np.ndarray:
        d = np.array([[np.sqrt(np.sum((z[i] - z[j]) ** 2)) for j in range(n)] for i in range(n)])
        row = [sum(d[i, k] for k in range(n)) / n for i in range(n)]
        col = [sum(d[k, j] for k in range(n)) / n for j in range(n)]
        grand = sum(row) / n
        return np.array([[d[i, j] - row[i] - col[j] + grand for j in range(n)] for i in range(n)])

    a, b = centred(x), centred(y)
    dcov = sum(a[i, j] * b[i, j] for i in range(n) for j in range(n)) / n**2
    dvar_x = sum(a[i, j] ** 2 for i in range(n) for j in range(n)) / n**2
    dvar_y = sum(b[i, j] ** 2 for i in range(n) for j in range(n)) / n**2
    return float(np.sqrt(dcov / np.sqrt(dvar_x * dvar_y)))


def test_distance_correlation_matches_the_direct_formula_and_is_differentiable() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5))
    y = np.concatenate([np.tanh(x[:, :2]) + 0.3 * rng.normal(size=(12, 2)), rng.normal(size=(12, 3))], axis=1)
    ours = distance_correlation(torch.tensor(x), torch.tensor(y))
    assert float(ours) == pytest.approx(_dcor_by_hand(x, y), rel=1e-10)
    assert float(distance_correlation(torch.tensor(x), torch.tensor(2 * x + 1))) == pytest.approx(1.0, rel=1e-10)
    # images against their smashed data: (n, ...) shapes are flattened per sample
    pixels = torch.tensor(rng.normal(size=(12, 1, 3, 3)), requires_grad=True)
    smashed = pixels.reshape(12, 9, 1).repeat(1, 1, 4) ** 2
    value = distance_correlation(pixels, smashed)
    value.backward()
    assert pixels.grad is not None and bool(torch.isfinite(pixels.grad).all()) and float(pixels.grad.abs().sum()) > 0
    assert float(distance_correlation(torch.tensor(x), torch.ones(12, 3, dtype=torch.float64))) == 0.0
