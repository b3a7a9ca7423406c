"""A Target and the attack data (auxiliary set, victims) from an ExperimentConfig, with a run's adapters if saved.

Only `sflam.platform.build` (validate, prepare_data, build_parts) and the codec are used, so the
attacks follow the experiment's own data split, model, cut, weight quantization and LoRA.

Auxiliary set: `privacy.aux_samples` sentences or images drawn with `privacy.seed` from the train
split. In the simulation every training sample belongs to some device's shard; the auxiliary set
stands for public data of the same distribution, and what a fair measurement needs holds: it is
disjoint from the victims. Victims: `privacy.victims` samples of the test split (the held-out set
of the experiment), drawn with the same seed; no attack ever trains on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sflam.platform.build import build_parts, prepare_data, validate
from sflam.platform.config import ExperimentConfig
from sflam.platform.data import DataBundle, ImageData, TokenizedData
from sflam.platform.errors import ConfigError
from sflam.platform.models import ModelSpec, load_tokenizer, patch_size
from sflam.platform.split import DevicePart
from sflam.privacy.target import ImageGeometry, Target

ADAPTER_FILE = "device_adapter.safetensors"  # written by sflam.pipelines.train.save_adapters


@dataclass(frozen=True)
class AttackSetup:
    """What the attacks run against: the target, the attacker's auxiliary data and the victims."""

    target: Target
    spec: ModelSpec
    bundle: DataBundle
    aux: TokenizedData | ImageData
    victims: TokenizedData | ImageData
    aux_indices: np.ndarray  # positions in the train split
    victim_indices: np.ndarray  # positions in the test split
    tokenizer: Any | None  # text: decodes token ids for ROUGE-L and the report
    special_ids: frozenset[int]  # text: tokens not counted as leaked (CLS, SEP, padding...)
    adapters: Path | None  # the run's device adapter, when one was loaded
    notes: tuple[str, ...]  # budgets the data could not meet, said in the report

    @property
    def modality(self) -> str:
        return self.target.modality


def adapter_path(config: ExperimentConfig) -> Path:
    return Path(config.output_dir) / config.name / ADAPTER_FILE


def load_adapters(part: DevicePart, path: Path) -> None:
    """Load a run's saved device adapter into the part's LoRA tensors; one line when it does not fit the config."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    trainable = {name for name, param in part.named_parameters() if param.requires_grad}
    unknown = sorted(set(tensors) - trainable)
    missing = sorted(trainable - set(tensors))
    if unknown or missing:
        raise ConfigError("device adapter", str(path), f"adapters of this config's device part "
                                                      f"({len(unknown)} unknown, {len(missing)} missing tensors)")
    params = dict(part.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise ConfigError("device adapter", str(path), f"a tensor {name} of shape {tuple(params[name].shape)}"
                                                              f" (saved {tuple(tensor.shape)}): another cut or rank?")
            params[name].copy_(tensor)


def _image_geometry(spec: ModelSpec, data: ImageData) -> ImageGeometry:
    patch = patch_size(spec.hf_config)
    grid = data.image_size // patch
    return ImageGeometry(data.image_size, patch, data.num_tokens - grid * grid, data.mean, data.std,
                         int(data.images.shape[-1]))


def _draw(count: int, available: int, rng: np.random.Generator, key: str, where: str, notes: list[str]) -> np.ndarray:
    if count > available:
        notes.append(f"{key}: {available} (the whole {where}; {count} asked)")
        count = available
    return np.sort(rng.choice(available, size=count, replace=False))


def build_setup(config: ExperimentConfig, adapters: bool = True, announce: Callable[[str], None] | None = None
                ) -> AttackSetup:
    """Validate, load data and model, cut it, load the run's adapters (when `adapters` and saved), wrap a Target."""
    spec = validate(config)
    bundle = prepare_data(config, spec)
    device_part, _ = build_parts(config, spec, bundle)
    path = adapter_path(config)
    loaded = None
    if adapters and path.is_file():
        load_adapters(device_part, path)
        loaded = path
    return setup_from_parts(config, spec, bundle, device_part, loaded, announce)


def setup_from_parts(config: ExperimentConfig, spec: ModelSpec, bundle: DataBundle, device_part: DevicePart,
                     loaded: Path | None = None, announce: Callable[[str], None] | None = None,
                     aux_samples: int | None = None, victims: int | None = None) -> AttackSetup:
    """The attack setup over an already built device part (a run's own, for its per-round leakage)."""
    privacy = config.privacy
    rng = np.random.default_rng(privacy.seed)
    notes: list[str] = []
    aux_indices = _draw(aux_samples or privacy.aux_samples, len(bundle.train), rng, "privacy.aux_samples",
                        "train split", notes)
    victim_indices = _draw(victims or privacy.victims, len(bundle.test), rng, "privacy.victims", "test split", notes)
    if announce is not None:
        for note in notes:
            announce(f"note: {note}")
    tokenizer, special = None, frozenset[int]()
    geometry = None
    if spec.is_vision:
        assert isinstance(bundle.train, ImageData)
        geometry = _image_geometry(spec, bundle.train)
    else:
        tokenizer = load_tokenizer(spec, config.model)
        special = frozenset(int(i) for i in tokenizer.all_special_ids) | {bundle.pad_token_id}
    target = Target(device_part, "image" if spec.is_vision else "text", config.quant.activation_bits,
                    config.quant.side_dtype, privacy.clip_norm, privacy.noise_sigma, privacy.seed,
                    bundle.pad_token_id, geometry)
    return AttackSetup(target, spec, bundle, bundle.train.subset(aux_indices), bundle.test.subset(victim_indices),
                       aux_indices, victim_indices, tokenizer, special, loaded, tuple(notes))
