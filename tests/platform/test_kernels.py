"""Quantized layers run the same kernels in every mode and on every host: no fused bf16 repacking in eval mode,
no kernel fetched from the hub at import, and the kernel path recorded with each run
(docs/concepts/models-and-data.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from sflam.platform.quantization import kernel_path, quantize_weights
from tests.conftest import ROOT

# A process on a CPU with AVX512-BF16, on any host: bitsandbytes' CPU backend is told the CPU has it before the
# backend's module runs; `kernels.get_kernel` reports every call on stderr instead of looking up the hub.
SIMULATED_BF16_HOST = textwrap.dedent("""
    import importlib.abc, importlib.util, sys, types
    hub = types.ModuleType("kernels")
    hub.get_kernel = lambda *a, **k: sys.stderr.write("HUB LOOKUP\\n") or (_ for _ in ()).throw(OSError("offline"))
    sys.modules["kernels"] = hub

    class Bf16Host(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "bitsandbytes.backends.cpu.ops":
                return None
            sys.meta_path.remove(self)
            import bitsandbytes.functional
            bitsandbytes.functional.has_avx512bf16 = lambda: True
            return importlib.util.find_spec(name)

    sys.meta_path.insert(0, Bf16Host())
""")


def _import_bitsandbytes(first: str) -> subprocess.CompletedProcess[str]:
    script = SIMULATED_BF16_HOST + f"{first}\nimport bitsandbytes\nimport bitsandbytes.backends.cpu.ops as ops\n" \
                                   "assert ops.gemm_4bit_forward_kernel is None\n"
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_importing_bitsandbytes_after_sflam_looks_up_no_kernel_hub() -> None:
    control = _import_bitsandbytes("")  # bitsandbytes alone on such a CPU asks the hub for its fused kernel
    assert control.returncode == 0 and "HUB LOOKUP" in control.stderr
    ours = _import_bitsandbytes("import sflam")
    assert ours.returncode == 0, ours.stderr
    assert ours.stderr == ""  # no lookup and nothing printed


def _forced_bf16_part(monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """A patch embedding of a ViT-S/14 (588 in-features, not a multiple of bitsandbytes' block of 64) and a
    384-wide layer, quantized to nf4 as if the CPU had AVX512-BF16."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    torch.manual_seed(0)
    part = nn.Sequential(nn.Conv2d(3, 384, kernel_size=14, stride=14), nn.Flatten(2), Transpose(), nn.Linear(384, 384))
    return quantize_weights(part, "nf4")


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def test_a_4bit_part_in_eval_mode_keeps_its_weights_and_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    part = _forced_bf16_part(monkeypatch)
    layers = [m for m in part.modules() if type(m).__name__ == "Linear4bit"]
    assert [m.in_features for m in layers] == [588, 384]
    before = [m.weight.data.clone() for m in layers]
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        trained_mode = part(pixels)
        part.eval()
        evaluated = part(pixels)  # bitsandbytes would repack in place here (and fail for the 588-wide layer)
    assert torch.equal(evaluated, trained_mode) and evaluated.dtype == torch.float32
    for layer, weight in zip(layers, before, strict=True):
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(layer.weight.data, weight)


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8", "nf4", "fp4"])
def test_the_kernel_path_names_the_compute_dtype_and_the_host(mode: str) -> None:
    path = kernel_path(mode)
    assert path["quant.compute_dtype"] == ("bfloat16" if mode == "bf16" else "float32")
    assert path["quant.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (mode in path["quant.kernel"]) or mode in ("fp32", "bf16")
