"""The attacks on held-out victims: exact recovery where the cut leaves nothing to hide, at least the least-squares
baselines, and less leakage with more noise or fewer bits."""

from __future__ import annotations

import functools

import pytest
import torch

from sflam.platform.config import PRIVACY_ATTACKS
from sflam.privacy.suite import ATTACKS, SuiteResult, run_suite
from tests.privacy.common import IMAGE, TEXT, config_of, setup_of

BUDGET = ("privacy.aux_samples=500", "privacy.inverse_steps=100", "privacy.optimisation_steps=60",
          "privacy.victims=16")
NOISE = {"text": ("privacy.clip_norm=40", (0.005, 0.02, 0.08)),  # messages of norm ~40, elements ~1
         "image": ("privacy.clip_norm=5", (0.004, 0.016, 0.064))}  # norm ~5, elements ~0.15
BASE = {"text": TEXT, "image": IMAGE}


@functools.cache
def suite_of(*overrides: str) -> SuiteResult:
    return run_suite(setup_of(*overrides), config_of(*overrides).privacy)


def test_the_registry_is_the_configs_list_of_attacks() -> None:
    assert tuple(ATTACKS) == PRIVACY_ATTACKS
    assert all(cls.name == name and cls.description for name, cls in ATTACKS.items())


def test_white_box_inversion_recovers_text_at_cut_0() -> None:
    """MiniLM-L6 (the packaged model) at cut 0 with fp32 weights and 32-bit messages: embeddings and a layer norm."""
    result = suite_of("model.name=minilm-l6", "split.cut_layer=0", "quant.weights=fp32", "quant.activation_bits=32",
                      "model.max_length=32", "privacy.victims=16", "privacy.optimisation_steps=20",
                      "privacy.attacks=[white-box]")
    (white_box,) = result.results
    assert result.info["victim_tokens"] > 200
    assert white_box.metrics["token_accuracy"] >= 0.95
    assert white_box.metrics["rouge_l"] >= 0.95


def test_white_box_inversion_recovers_digits_at_cut_0() -> None:
    result = suite_of(*IMAGE, "split.cut_layer=0", "quant.weights=fp32", "quant.activation_bits=32",
                      "privacy.victims=16", "privacy.optimisation_steps=60", "privacy.attacks=[white-box]")
    (white_box,) = result.results
    assert white_box.metrics["ssim"] >= 0.9 and white_box.metrics["ssim_original"] >= 0.9
    assert white_box.metrics["psnr_original_db"] > 25


def test_the_image_prior_is_fitted_on_the_auxiliary_images() -> None:
    from sflam.privacy.whitebox import smoothness, total_variation

    stripes = torch.zeros(3, 4, 4)
    stripes[:, :, 1::2] = 1.0  # neighbours differ by 1 across, by 0 down: s² = 12 / 24 = 0.5
    assert smoothness(stripes) == pytest.approx(1.0)
    assert float(total_variation(stripes)) == pytest.approx(3 * 4 * 3)


@pytest.mark.parametrize(("modality", "cut", "bits", "sigma"), [
    ("text", 1, 8, 0.0), ("text", 2, 4, 0.0), ("text", 1, 32, 0.02),
    ("image", 0, 8, 0.0), ("image", 1, 4, 0.0), ("image", 0, 32, 0.016)])
def test_the_best_attack_leaks_at_least_as_much_as_the_least_squares_baseline(modality: str, cut: int, bits: int,
                                                                              sigma: float) -> None:
    noise = (NOISE[modality][0], f"privacy.noise_sigma={sigma}") if sigma else ()
    result = suite_of(*BASE[modality], *BUDGET, f"split.cut_layer={cut}", f"quant.activation_bits={bits}", *noise)
    metric = result.headline
    baseline = next(r for r in result.results if r.name == "linear")
    others = [r for r in result.results if r.name != "linear"]
    assert max(r.metrics[metric] for r in others) >= baseline.metrics[metric]
    assert baseline.metrics[metric] > (0.05 if modality == "text" else 0.5)  # the baseline itself is no strawman


@pytest.mark.parametrize("modality", ["text", "image"])
def test_more_noise_leaks_less(modality: str) -> None:
    clip, sigmas = NOISE[modality]
    leakage = []
    for sigma in sigmas:
        result = suite_of(*BASE[modality], *BUDGET, "split.cut_layer=1" if modality == "text" else "split.cut_layer=0",
                          "quant.activation_bits=32", clip, f"privacy.noise_sigma={sigma}")
        leakage.append(result.best().metrics[result.headline])
    assert leakage[0] > leakage[1] > leakage[2], leakage


@pytest.mark.parametrize("modality", ["text", "image"])
def test_two_bits_leak_less_than_32(modality: str) -> None:
    cut = "split.cut_layer=1" if modality == "text" else "split.cut_layer=0"
    coarse = suite_of(*BASE[modality], *BUDGET, cut, "quant.activation_bits=2")
    exact = suite_of(*BASE[modality], *BUDGET, cut, "quant.activation_bits=32")
    assert coarse.best().metrics[coarse.headline] < exact.best().metrics[exact.headline]


def test_attacks_are_seeded() -> None:
    overrides = (*TEXT, "privacy.aux_samples=200", "privacy.inverse_steps=20", "privacy.optimisation_steps=10",
                 "privacy.victims=4", "split.cut_layer=1")
    first = run_suite(setup_of(*overrides), config_of(*overrides).privacy)
    second = run_suite(setup_of(*overrides, "name=again"), config_of(*overrides).privacy)
    for a, b in zip(first.results, second.results, strict=True):
        assert torch.equal(a.reconstruction, b.reconstruction) and a.metrics == b.metrics
