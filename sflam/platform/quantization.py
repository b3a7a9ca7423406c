"""Quantization of the device part's frozen base weights with bitsandbytes, and their stored size."""

from __future__ import annotations

import copyreg
import logging
import warnings
from typing import TypeGuard

import torch
from torch import nn

# bitsandbytes' notices at import (its CPU backend's optional fused kernel, see sflam._imports) are not ours
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb

BLOCKSIZE = 64


def _rebuild_quantized(cls: type, data: torch.Tensor, requires_grad: bool, state: dict) -> torch.Tensor:
    param: torch.Tensor = torch.Tensor._make_subclass(cls, data, requires_grad)
    param.__dict__.update(state)
    return param


def _reduce_quantized(param: torch.Tensor) -> tuple:
    """Pickle a bitsandbytes parameter as itself: torch's Parameter reduction would return a plain Parameter
    without its class, so a device part shared through Ray's object store keeps its quantized layers whole."""
    return _rebuild_quantized, (type(param), param.detach().as_subclass(torch.Tensor), param.requires_grad,
                                dict(param.__dict__))


for _cls in (bnb.nn.Params4bit, bnb.nn.Int8Params):
    copyreg.pickle(_cls, _reduce_quantized)


def _linear_4bit(layer: nn.Linear, quant_type: str) -> nn.Module:
    new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            compute_dtype=torch.float32, quant_type=quant_type, quant_storage=torch.uint8)
    new.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                   blocksize=BLOCKSIZE)
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
    # On an AVX512-BF16 CPU, bitsandbytes' Linear4bit in eval mode (input without grad) repacks its weight in place
    # for a fused bf16 inference kernel: the layer then computes in bf16 (other numbers than in training) and the
    # repacking fails for in-features that are not a multiple of 64 (a ViT-S/14 patch embedding has 588). The
    # device part computes in fp32 on every host and in every mode (`kernel_path`).
    new.support_avx512bf16_for_cpu = False
    return new.to("cpu")


def _linear_8bit(layer: nn.Linear) -> nn.Module:
    new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              has_fp16_weights=False, threshold=0.0)
    new.weight = bnb.nn.Int8Params(layer.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
    return new.to("cpu")


def _embedding(layer: nn.Embedding, mode: str) -> nn.Module:
    num, dim = layer.weight.shape
    if mode == "int8":
        new = bnb.nn.Embedding8bit(num, dim)
        new.load_state_dict({"weight": layer.weight.data.clone()})
        return new.to("cpu")
    new = bnb.nn.EmbeddingNF4(num, dim) if mode == "nf4" else bnb.nn.EmbeddingFP4(num, dim)
    # plain absmax statistics: bitsandbytes' row-wise lookup misreads nested statistics of small tables
    new.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type=mode,
                                   blocksize=BLOCKSIZE, compress_statistics=False)
    return new.to("cpu")


class PatchLinear(nn.Module):
    """A patch-embedding convolution (kernel = stride, no padding) as a linear map over flattened patches.

    The same function as the convolution, in a form bitsandbytes can store: a vision transformer's
    device part at cut 0 is little more than this layer, and its weights quantize like any linear layer.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        out_channels, in_channels, height, width = conv.weight.shape
        self.kernel = (height, width)
        self.linear = nn.Linear(in_channels * height * width, out_channels, bias=conv.bias is not None)
        with torch.no_grad():  # F.unfold orders a patch channel-major, then rows, then columns, as the weight
            self.linear.weight.copy_(conv.weight.reshape(out_channels, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)
        self.linear.weight.requires_grad_(conv.weight.requires_grad)
        # patch embeddings cast the pixels to `projection.weight.dtype`: the compute dtype, not the storage's
        self.register_buffer("_compute", torch.empty(0, dtype=conv.weight.dtype), persistent=False)

    _compute: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:
        return self._compute

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixels.shape
        patches = nn.functional.unfold(pixels, self.kernel, stride=self.kernel).transpose(1, 2)
        out = self.linear(patches)  # (B, patches, out_channels)
        grid = (height // self.kernel[0], width // self.kernel[1])
        return out.transpose(1, 2).reshape(batch, -1, *grid)  # the convolution's (B, C, h, w)


def kernel_path(mode: str) -> dict[str, str]:
    """Which kernels the device part's quantized layers run on this host for weight mode `mode` (recorded with
    every run: rounding differs between kernel sets). Forward and backward compute in fp32 for every mode but
    bf16: 4-bit weights are dequantized blockwise to fp32 (bitsandbytes' AVX512 kernel where torch reports AVX512,
    its generic kernel elsewhere) and multiplied by torch's fp32 matmul; bitsandbytes' fused AVX512-BF16 4-bit
    inference kernel is never used (see `_linear_4bit`); int8 weights use bitsandbytes' int8 matmul (torch's
    `_int_mm` where torch reports AVX512) with fp32 scaling; bf16 weights run under torch's bf16 autocast."""
    capability = torch.backends.cpu.get_cpu_capability()
    avx512 = capability == "AVX512"
    kernels = {"fp32": "torch fp32 matmul",
               "bf16": "torch bf16 autocast",
               "int8": f"bitsandbytes int8 ({'torch _int_mm' if avx512 else 'generic int8 matmul'}), fp32 scaling",
               "nf4": f"bitsandbytes nf4 dequantize ({'avx512' if avx512 else 'generic'}) to fp32, torch fp32 matmul",
               "fp4": f"bitsandbytes fp4 dequantize ({'avx512' if avx512 else 'generic'}) to fp32, torch fp32 matmul"}
    return {"quant.kernel": kernels[mode], "quant.compute_dtype": "bfloat16" if mode == "bf16" else "float32",
            "quant.cpu_capability": capability}


def _is_patch_conv(layer: nn.Module) -> TypeGuard[nn.Conv2d]:
    return (isinstance(layer, nn.Conv2d) and layer.kernel_size == layer.stride and layer.groups == 1
            and layer.padding in ((0, 0), 0) and layer.dilation == (1, 1))


def quantize_weights(part: nn.Module, mode: str) -> nn.Module:
    """Store the linear and embedding weights of `part` as `mode`, in place; norms stay fp32.

    fp32 keeps them; bf16 casts them and the part must run under bf16 autocast; int8, nf4 and fp4
    swap in bitsandbytes layers (blockwise, blocksize 64, nested absmax statistics for 4 bit). A vision
    transformer's patch-embedding convolution becomes the equivalent PatchLinear first, so it quantizes too.
    """
    if mode == "fp32":
        return part
    if mode != "bf16":
        for parent in list(part.modules()):
            for child_name, child in list(parent.named_children()):
                if _is_patch_conv(child):
                    setattr(parent, child_name, PatchLinear(child))
    for parent in list(part.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if mode == "bf16":
                    child.to(torch.bfloat16)
                    continue
                new = _linear_8bit(child) if mode == "int8" else _linear_4bit(child, mode)
            elif isinstance(child, nn.Embedding):
                if mode == "bf16":
                    child.to(torch.bfloat16)
                    continue
                new = _embedding(child, mode)
            else:
                continue
            setattr(parent, child_name, new)
    if mode == "bf16" and hasattr(part, "autocast_dtype"):
        part.autocast_dtype = torch.bfloat16
    return part


def _quant_state_bytes(state) -> int:
    total = 0
    for attr in ("absmax", "code", "offset"):
        value = getattr(state, attr, None)
        if isinstance(value, torch.Tensor):
            total += value.nbytes
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


def stored_weight_bytes(module: nn.Module, trainable: bool = False) -> int:
    """Bytes of the weights as stored: packed values plus quantization statistics.

    trainable=False counts frozen tensors only (the base weights); True counts everything.
    """
    total = 0
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            if param.requires_grad and not trainable:
                continue
            total += param.data.nbytes
            state = getattr(param, "quant_state", None)
            if state is not None:
                total += _quant_state_bytes(state)
            scb = getattr(param, "SCB", None)
            if scb is None and isinstance(getattr(sub, "state", None), bnb.MatmulLtState):
                scb = sub.state.SCB
            if isinstance(scb, torch.Tensor):
                total += scb.nbytes
    return total


def quantized_layer_bytes(part: nn.Module) -> tuple[int, int]:
    """(stored bytes, fp32 bytes) over the quantized linear and embedding layers of `part`."""
    stored = fp32 = 0
    kinds = (nn.Linear, nn.Embedding, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, bnb.nn.Embedding4bit,
             bnb.nn.Embedding8bit)
    for sub in part.modules():
        base = getattr(sub, "base_layer", None)  # peft wraps quantized layers
        if isinstance(sub, kinds) and not _is_lora_piece(part, sub):
            stored += stored_weight_bytes(sub)
            fp32 += 4 * sum(_logical_numel(p, sub) for p in sub.parameters(recurse=False) if not p.requires_grad)
        del base
    return stored, fp32


def _is_lora_piece(root: nn.Module, module: nn.Module) -> bool:
    for name, sub in root.named_modules():
        if sub is module:
            return "lora_" in name
    return False


def _logical_numel(param: torch.Tensor, owner: nn.Module) -> int:
    """Number of logical weights (a 4-bit parameter packs two per byte)."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()
