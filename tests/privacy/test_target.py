"""The Target: messages as the server sees them, the white-box forward from embeddings, the image geometry, and a
run's saved adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sflam.platform.codec import step_size
from sflam.platform.data import collate
from sflam.platform.errors import ConfigError
from sflam.privacy.build import ADAPTER_FILE, build_setup
from sflam.privacy.defences import sample_norms
from sflam.privacy.target import word_embeddings
from tests.privacy.common import IMAGE, TEXT, config_of, setup_of


def _batch(setup, count: int = 6):
    batch = collate(setup.victims, np.arange(count), setup.target.pad_token_id)
    return batch.input_ids, batch.attention_mask


def test_messages_are_the_device_parts_output_through_the_codec() -> None:
    exact = setup_of(*TEXT, "split.cut_layer=1", "quant.activation_bits=32", "quant.weights=fp32")
    ids, mask = _batch(exact)
    with torch.no_grad():
        hidden = exact.target.part(ids, mask)
    messages = exact.target.messages(ids, mask)
    real = mask.bool()
    assert torch.equal(messages[real], hidden[real]) and bool((messages[~real] == 0).all())
    coarse = setup_of(*TEXT, "split.cut_layer=1", "quant.activation_bits=4", "quant.weights=fp32")
    received = coarse.target.messages(ids, mask)
    step = step_size(hidden[real], 4)
    error = (received[real] - hidden[real]).abs()
    assert bool((error <= step[:, None] * (1 + 1e-5)).all()) and float(error.max()) > 0


def test_messages_carry_the_defence() -> None:
    clipped = setup_of(*TEXT, "split.cut_layer=1", "quant.activation_bits=32", "privacy.clip_norm=5")
    ids, mask = _batch(clipped)
    real = mask.bool()
    norms = sample_norms(clipped.target.messages(ids, mask)[real], real.sum(1))
    assert float(norms.max()) == pytest.approx(5.0, rel=1e-5)
    noisy = setup_of(*TEXT, "split.cut_layer=1", "quant.activation_bits=32", "privacy.clip_norm=5",
                     "privacy.noise_sigma=0.5")
    difference = noisy.target.messages(ids, mask)[real] - clipped.target.messages(ids, mask)[real]
    assert float(difference.std()) == pytest.approx(2.5, rel=0.05)  # sigma * C per element


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama", "tiny-gpt2"])
def test_forward_from_embeddings_equals_the_forward_of_token_ids(model: str) -> None:
    setup = setup_of(*TEXT, f"model.name={model}", "split.cut_layer=2", "quant.weights=fp32")
    ids, mask = _batch(setup)
    embeddings = word_embeddings(setup.target.part)(ids)
    from_ids = setup.target.forward(ids, mask)
    from_embeddings = setup.target.forward_embeddings(embeddings, mask)
    assert torch.allclose(from_embeddings, from_ids, atol=1e-5)
    assert torch.allclose(setup.target.embedding_table()[ids], embeddings)


def test_quantized_layers_stay_in_train_mode() -> None:
    """bitsandbytes' 4-bit layers in eval mode repack their weights in place on AVX512-BF16 CPUs
    (docs/concepts/split-and-codec.md)."""
    import bitsandbytes as bnb

    setup = setup_of(*TEXT, "split.cut_layer=1", "quant.weights=nf4")
    ids, mask = _batch(setup)
    setup.target.messages(ids, mask)
    setup.target.forward_embeddings(setup.target.embedding_table()[ids], mask)
    four_bit = [m for m in setup.target.part.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.training for m in four_bit)


def test_image_geometry_matches_the_data_pipeline_and_inverts_its_resize() -> None:
    setup = setup_of(*IMAGE, "split.cut_layer=0")
    geometry = setup.target.geometry
    assert geometry is not None and (geometry.size, geometry.original_size, geometry.first_patch) == (28, 8, 1)
    pixels, _ = _batch(setup)
    stored = torch.as_tensor(setup.victims.images[:6])
    assert torch.allclose(geometry.to_grey(pixels), geometry.from_original(stored), atol=1e-6)
    assert torch.allclose(geometry.to_input(geometry.to_grey(pixels)), pixels, atol=1e-6)
    assert torch.allclose(geometry.to_original(geometry.from_original(stored)), stored, atol=1e-5)


def test_a_runs_saved_adapter_is_loaded_and_a_foreign_one_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    overrides = (*TEXT, "split.cut_layer=1", "quant.weights=fp32", f"output_dir={tmp_path}", "name=run")
    fresh = build_setup(config_of(*overrides), adapters=False)
    generator = torch.Generator().manual_seed(0)
    trained = {name: 0.1 * torch.randn(p.shape, generator=generator)
               for name, p in fresh.target.part.named_parameters() if "lora_" in name}
    (tmp_path / "run").mkdir()
    save_file(trained, str(tmp_path / "run" / ADAPTER_FILE))
    loaded = build_setup(config_of(*overrides))
    assert loaded.adapters == tmp_path / "run" / ADAPTER_FILE
    params = dict(loaded.target.part.named_parameters())
    assert all(torch.equal(params[name], tensor) for name, tensor in trained.items())
    ids, mask = _batch(fresh)
    assert not torch.allclose(loaded.target.forward(ids, mask), fresh.target.forward(ids, mask))
    with pytest.raises(ConfigError, match="device adapter"):
        build_setup(config_of(*overrides, "split.cut_layer=2"))
