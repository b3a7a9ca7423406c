"""Imports of third-party code that would otherwise reach for the network or print at import time.

bitsandbytes' CPU backend, on a CPU with AVX512-BF16, asks the `kernels` package at import for a fused 4-bit
inference kernel from the Hugging Face hub (`kernels-community/quantization-bitsandbytes`): a network lookup
(or, offline, a notice on stderr) in every process that imports it, for a kernel SFLAM never runs (the quantized
layers compute in fp32, `sflam.platform.quantization`). While bitsandbytes itself is being imported, `kernels`
is made unimportable, so its backend takes its own no-kernel branch: no lookup, nothing printed. Every other
import of `kernels` (transformers') is untouched.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from typing import Any

_MISSING = object()


class _WithoutKernelHub(importlib.abc.Loader):
    """Runs bitsandbytes' own loader with `kernels` absent from `sys.modules` lookups."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        saved = sys.modules.get("kernels", _MISSING)
        sys.modules["kernels"] = None  # type: ignore[assignment]  # `import kernels` raises ImportError
        logger = logging.getLogger("bitsandbytes")
        level = logger.level
        logger.setLevel(logging.ERROR)  # its "could not load the fused kernel" notice: the branch we chose
        try:
            self.loader.exec_module(module)
        finally:
            logger.setLevel(level)
            if saved is _MISSING:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = saved  # type: ignore[assignment]


class _BitsandbytesFinder(importlib.abc.MetaPathFinder):
    """Finds `bitsandbytes` as usual, then wraps its loader (once: the package imports its backends itself)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "bitsandbytes":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _WithoutKernelHub(spec.loader)
        return spec


def guard_bitsandbytes() -> None:
    """Install the finder unless bitsandbytes is already imported (then it is too late to matter here)."""
    if "bitsandbytes" in sys.modules or any(isinstance(f, _BitsandbytesFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _BitsandbytesFinder())
