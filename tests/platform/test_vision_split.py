"""The vision split is exact: loss and every gradient equal the unsplit ViT's / Dinov2's
(docs/concepts/split-and-codec.md)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
)

from sflam.platform import codec
from sflam.platform.config import ModelConfig
from sflam.platform.messages import Smashed
from sflam.platform.models import load_model, resolve_model
from sflam.platform.quantization import PatchLinear, quantize_weights, stored_weight_bytes
from sflam.platform.server import ServerRunner
from sflam.platform.split import split_model

pytestmark = pytest.mark.equality

TOL = 1e-5


def _images(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, size, size, generator=g), torch.tensor([0, 1, 2, 1])


def _worst(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest max-abs error relative to each gradient's scale (floored at 1e-3 of the largest gradient,
    so analytically-zero gradients do not divide rounding noise by rounding noise)."""
    scale = max(float(t.abs().max()) for t in expected.values())
    errors = {n: float((got[n] - e).abs().max() / e.abs().max().clamp_min(1e-3 * scale)) for n, e in expected.items()}
    name = max(errors, key=errors.__getitem__)
    return errors[name], name


def _check_exact(model, cut: int) -> None:
    pixels, labels = _images(int(model.config.image_size))
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad()
    reference = model(pixel_values=pixels, labels=labels).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    device_part, server_part = split_model(model, "vit", cut, "classification")
    hidden = device_part(pixels, torch.ones(1, 1, dtype=torch.long))  # probe the token count first
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    model.zero_grad()
    hidden = device_part(pixels, mask)
    loss, correct = server_part.loss_and_correct(server_part(hidden, mask), labels)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert abs(loss.item() - reference.item()) <= TOL * abs(reference.item())
    assert 0 <= int(correct) <= 4
    assert got.keys() == expected.keys()
    assert any("patch_embeddings" in n for n in got) and any("classifier" in n for n in got)
    worst, name = _worst(got, expected)
    assert worst <= TOL, f"largest relative gradient error {worst:.2e} in {name}"


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-dinov2"])
@pytest.mark.parametrize("cut", [0, 1, 3, 4])
def test_vision_split_is_exact(name: str, cut: int) -> None:
    spec = resolve_model(ModelConfig(name=name))
    assert spec.family == "vit" and spec.num_layers == 4
    model = load_model(spec, ModelConfig(name=name), num_labels=3, pad_token_id=0)
    _check_exact(model, cut)


@pytest.mark.parametrize("member", ["deit", "dinov2-registers"])
@pytest.mark.parametrize("cut", [0, 1, 2])
def test_vision_family_members_split_exactly(member: str, cut: int) -> None:
    torch.manual_seed(0)
    if member == "deit":  # a CLS and a distillation token before the patches
        model = DeiTForImageClassification(DeiTConfig(image_size=28, patch_size=7, hidden_size=32,
                                                      intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_labels=3))
    else:  # register tokens between CLS and patches, left out of the head's patch mean
        model = Dinov2WithRegistersForImageClassification(Dinov2WithRegistersConfig(
            image_size=28, patch_size=7, hidden_size=32, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4,
            num_register_tokens=2, num_labels=3))
    _check_exact(model.eval(), cut)


def test_smashed_data_is_the_token_sequence() -> None:
    """Cut 0: patch tokens plus CLS, hidden width, with the position embeddings already added."""
    spec = resolve_model(ModelConfig(name="tiny-vit"))
    model = load_model(spec, ModelConfig(name="tiny-vit"), num_labels=10, pad_token_id=0)
    device_part, _ = split_model(model, "vit", 0, "classification")
    pixels, _ = _images(28)
    hidden = device_part(pixels, torch.ones(4, 17, dtype=torch.long))
    assert hidden.shape == (4, (28 // 7) ** 2 + 1, 64)
    assert sum(1 for _ in device_part.layers) == 0
    emb = model.vit.embeddings
    expected_cls = emb.cls_token[0, 0] + emb.position_embeddings[0, 0]
    assert torch.allclose(hidden[:, 0], expected_cls.expand(4, -1))


@pytest.mark.parametrize("mode", ["int8", "nf4", "bf16"])
def test_quantized_vision_device_part_trains(mode: str) -> None:
    """Device weights quantize as for text: stored smaller, forward close to fp32, gradients reach LoRA."""
    from sflam.platform.build import DataBundle, build_parts
    from sflam.platform.config import load_config

    cfg = load_config(None, ["model.name=tiny-vit", "data.dataset=digits", f"quant.weights={mode}",
                             "split.cut_layer=2"])
    spec = resolve_model(cfg.model)
    bundle = DataBundle(None, None, [], 3, 0, None)  # type: ignore[arg-type]  # build_parts reads the labels only
    device_part, _ = build_parts(cfg, spec, bundle)
    fp32_cfg = load_config(None, ["model.name=tiny-vit", "data.dataset=digits", "quant.weights=fp32",
                                  "split.cut_layer=2"])
    reference, _ = build_parts(fp32_cfg, spec, bundle)
    assert stored_weight_bytes(device_part) < stored_weight_bytes(reference)
    pixels, _ = _images(28)
    mask = torch.ones(4, 17, dtype=torch.long)
    hidden = device_part(pixels, mask)
    expected = reference(pixels, mask)
    assert float((hidden - expected).detach().abs().max() / expected.detach().abs().max()) < 0.1
    hidden.square().mean().backward()
    # B starts at zero (so A's first gradient is zero): every B of both blocks gets a gradient
    lora_b = [p for n, p in device_part.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 4 and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora_b)


def test_patch_linear_equals_the_patch_convolution() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, kernel_size=7, stride=7)
    pixels, _ = _images(28)
    with torch.no_grad():
        expected = conv(pixels)
        assert float((PatchLinear(conv)(pixels) - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


@pytest.mark.parametrize(("name", "mode", "saved", "error"),
                         [("tiny-vit", "int8", 3 - 4 / 147, 0.02), ("tiny-dinov2", "nf4", 3.0, 0.15)])
def test_cut_zero_device_part_quantizes_its_patch_embedding(name: str, mode: str, saved: float, error: float) -> None:
    """At cut 0 the device part is the patch embedding: its 64x3x7x7 weights shrink from 4 bytes to 1
    (int8, plus a 4-byte scale per output row) or to half a byte plus block statistics (nf4)."""
    spec = resolve_model(ModelConfig(name=name))
    model = load_model(spec, ModelConfig(name=name), num_labels=3, pad_token_id=0)
    device_part, _ = split_model(model, "vit", 0, "classification")
    pixels, _ = _images(28)
    mask = torch.ones(4, 17, dtype=torch.long)
    with torch.no_grad():
        expected = device_part(pixels, mask)
        fp32_bytes = stored_weight_bytes(device_part)
        quantize_weights(device_part, mode)
        assert fp32_bytes - stored_weight_bytes(device_part) >= saved * 64 * 3 * 7 * 7
        relative = float((device_part(pixels, mask) - expected).norm() / expected.norm())
    print(f"{mode}: relative error {relative:.4f}")
    assert relative < error


def test_transmission_of_tokens_at_32_bits_is_exact() -> None:
    """Device part -> raw smashed tokens -> server step -> raw gradients: the unsplit model's gradients."""
    spec = resolve_model(ModelConfig(name="tiny-dinov2"))
    model = load_model(spec, ModelConfig(name="tiny-dinov2"), num_labels=3, pad_token_id=0)
    for p in model.parameters():
        p.requires_grad_(True)
    device_part, server_part = split_model(model, "vit", 1, "classification")
    server = ServerRunner(server_part, 32, "fp32", lr=1e-3, seed=0, send_gradients=True)
    server.optimizer = None
    pixels, labels = _images(28)
    hiddens, messages = [], []
    for k, rows in enumerate([slice(0, 2), slice(2, 4)]):
        mask = torch.ones(2, 17, dtype=torch.long)
        hidden = device_part(pixels[rows], mask)
        hiddens.append(hidden)
        messages.append(Smashed(k, codec.encode(hidden[mask.bool()], 32), mask, labels[rows]))
    result = server.step(messages, 0, 0)
    for hidden, gradient in zip(hiddens, result.gradients, strict=True):
        hidden.backward(codec.decode(gradient).reshape(hidden.shape))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference = model(pixel_values=pixels, labels=labels).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert abs(result.loss - reference.item()) <= TOL * reference.item()
    worst, name = _worst(got, expected)
    assert worst <= TOL, f"largest relative gradient error {worst:.2e} in {name}"


def test_local_folder_vision_models_load_with_their_image_processor(tmp_path) -> None:
    """A saved Dinov2 folder: family and depth from its config, the input side from the processor's crop
    (not the config's 518-pixel position grid), its mean and std, and a new head for our classes."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2ForImageClassification

    torch.manual_seed(0)
    model = Dinov2ForImageClassification(Dinov2Config(image_size=518, patch_size=14, hidden_size=32, mlp_ratio=2,
                                                      num_hidden_layers=2, num_attention_heads=4, num_labels=1000))
    model.save_pretrained(tmp_path)
    BitImageProcessor(crop_size={"height": 224, "width": 224}, image_mean=[0.4, 0.5, 0.6],
                      image_std=[0.2, 0.3, 0.4]).save_pretrained(tmp_path)
    spec = resolve_model(ModelConfig(name=str(tmp_path)))
    assert (spec.family, spec.num_layers, spec.source) == ("vit", 2, "pretrained")
    assert (spec.image_size, spec.image_mean, spec.image_std) == (224, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    loaded = load_model(spec, ModelConfig(name=str(tmp_path)), num_labels=10, pad_token_id=0)
    assert loaded.classifier.out_features == 10
    assert torch.equal(loaded.dinov2.encoder.layer[1].mlp.fc2.weight, model.dinov2.encoder.layer[1].mlp.fc2.weight)


def test_local_folder_vit_without_crop_uses_its_resize(tmp_path) -> None:
    """A ViT folder whose processor only resizes (to 32 px, not the config's 28): that side is the input,
    and the position embeddings are interpolated for it."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=28, patch_size=4, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4)).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}, do_center_crop=True).save_pretrained(tmp_path)
    spec = resolve_model(ModelConfig(name=str(tmp_path)))
    assert (spec.image_size, spec.image_mean) == (32, (0.5, 0.5, 0.5))
    model = load_model(spec, ModelConfig(name=str(tmp_path)), num_labels=3, pad_token_id=0)
    device_part, server_part = split_model(model, "vit", 1, "classification")
    pixels, _ = _images(32)
    mask = torch.ones(4, (32 // 4) ** 2 + 1, dtype=torch.long)
    hidden = device_part(pixels, mask)
    assert hidden.shape == (4, 65, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
    assert torch.allclose(server_part(hidden, mask), expected, atol=1e-5)


@pytest.mark.parametrize("member", ["vit", "deit"])
@pytest.mark.parametrize("cut", [0, 2])
def test_another_image_size_interpolates_as_the_model_does(member: str, cut: int) -> None:
    """Images of 42 pixels into a model made for 28 (model.image_size): the device part interpolates the position
    embeddings as the unsplit model does with interpolate_pos_encoding=True, so the logits are the same."""
    torch.manual_seed(0)
    if member == "vit":
        spec = resolve_model(ModelConfig(name="tiny-vit"))
        model = load_model(spec, ModelConfig(name="tiny-vit"), num_labels=3, pad_token_id=0)
    else:
        model = DeiTForImageClassification(DeiTConfig(image_size=28, patch_size=7, hidden_size=32,
                                                      intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_labels=3))
    model = model.eval()
    pixels, _ = _images(42)
    reference = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
    device_part, server_part = split_model(model, "vit", cut, "classification")
    hidden = device_part(pixels, torch.ones(1, 1, dtype=torch.long))
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    assert hidden.shape[1] == (42 // 7) ** 2 + (1 if member == "vit" else 2)
    assert torch.allclose(server_part(hidden, mask), reference, atol=1e-5, rtol=1e-5)
