"""Device-part weight quantization: stored bytes, and training through quantized weights."""

from __future__ import annotations

import pytest
import torch

from sflam.platform.assembly import Experiment
from sflam.platform.build import build_parts, prepare_data, validate
from sflam.platform.config import ModelConfig
from sflam.platform.data import collate
from sflam.platform.local import run_round
from sflam.platform.models import load_model, resolve_model
from sflam.platform.quantization import quantize_weights, quantized_layer_bytes, stored_weight_bytes
from sflam.platform.split import split_model
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def minilm_device_parts():
    spec = resolve_model(ModelConfig())
    parts = {}
    for mode in ("fp32", "bf16", "int8", "nf4", "fp4"):
        model = load_model(spec, ModelConfig(), 2, 0)
        device_part, _ = split_model(model, "bert", 2, "classification")
        parts[mode] = quantize_weights(device_part, mode)
    return parts


@pytest.mark.parametrize(("mode", "limit"), [("int8", 0.30), ("nf4", 0.16), ("fp4", 0.16), ("bf16", 0.5)])
def test_stored_bytes_of_quantized_layers(minilm_device_parts, mode: str, limit: float) -> None:
    stored, fp32 = quantized_layer_bytes(minilm_device_parts[mode])
    stored_fp32, fp32_again = quantized_layer_bytes(minilm_device_parts["fp32"])
    assert fp32 == fp32_again == stored_fp32  # the same logical weights
    assert stored <= limit * fp32, f"{mode}: {stored / fp32:.3f} of fp32"
    assert stored_weight_bytes(minilm_device_parts[mode]) < stored_weight_bytes(minilm_device_parts["fp32"])


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4", "bf16"])
def test_quantized_device_part_stays_close_to_fp32(minilm_device_parts, mode: str) -> None:
    ids = torch.randint(1000, 5000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = minilm_device_parts["fp32"](ids, mask)
        quantized = minilm_device_parts[mode](ids, mask)
    assert torch.isfinite(quantized).all()
    relative = float((quantized - reference).norm() / reference.norm())
    assert relative < {"int8": 0.05, "bf16": 0.05, "nf4": 0.35, "fp4": 0.35}[mode]


@pytest.mark.parametrize("mode", ["nf4", "int8", "fp4", "bf16"])
def test_training_through_quantized_device_part_lowers_the_loss(mode: str) -> None:
    # the server part frozen (a learning rate far below any update's rounding): only the device adapters, trained
    # through the quantized base weights, can lower the loss
    config = tiny_config(f"quant.weights={mode}", "train.rounds=6", "train.local_steps=3", "split.cut_layer=2",
                         "train.server_lr=1e-30")
    exp = Experiment.build(config)
    fixed = collate(exp.data.train, list(range(64)), exp.data.pad_token_id)

    def loss_of(adapter) -> float:
        with torch.no_grad():
            hidden = torch.func.functional_call(exp.device.part, adapter, (fixed.input_ids, fixed.attention_mask),
                                                strict=False)
            loss, _ = exp.server.part.loss_and_correct(exp.server.part(hidden, fixed.attention_mask), fixed.labels)
        return float(loss)

    adapter = exp.device.initial_adapter()
    assert adapter, "the device part has LoRA adapters"
    before = loss_of(adapter)
    start = {n: t.clone() for n, t in adapter.items()}
    server = {n: t.clone() for n, t in exp.server.part.state_dict().items()}
    for round_index in range(config.train.rounds):
        adapter, _ = run_round(exp, round_index, adapter)
    after = exp.server.part.state_dict()
    # (its zero-initialised LoRA B moves by about the learning rate, 1e-30, and nothing else moves at all)
    assert max(float((server[n] - after[n]).abs().max()) for n in server) < 1e-20, "the server part stayed"
    assert loss_of(adapter) < before - 0.05
    assert any(not torch.equal(start[n], adapter[n]) for n in adapter), "device adapters were trained"


def test_quantized_base_weights_are_frozen() -> None:
    config = tiny_config("quant.weights=nf4")
    spec = validate(config)
    device_part, server_part = build_parts(config, spec, prepare_data(config, spec))
    trainable = [n for n, p in device_part.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all("lora_" in n or n.startswith("head.") for n, p in server_part.named_parameters() if p.requires_grad)
