"""On-disk cache of what start-up measures on the real model: FLOP tables and device memory
(docs/concepts/ray-runtime.md).

An entry is a small JSON file named by the SHA-256 of everything its figures depend on (the caller's
fields: model, cut layer, weight mode, LoRA, batch shape...; a fingerprint of the built parts; the
versions of torch, transformers, peft and bitsandbytes), so a changed setting or library is a new key
and a stale entry is never read. Files are written atomically; an unreadable or malformed entry is
measured again and overwritten, never an error.

Location: `$SFLAM_COST_CACHE` if set (`off` disables the cache), else `costs/` in sflam's cache folder:
`$SFLAM_CACHE`, else `$XDG_CACHE_HOME/sflam`, else `~/.cache/sflam`.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from sflam.platform.config import ExperimentConfig
from sflam.platform.files import write_text

ROOT_ENV = "SFLAM_CACHE"        # sflam's cache folder (also the converted dinov2-s14 backbone's)
CACHE_ENV = "SFLAM_COST_CACHE"  # this cache's own folder, or "off"
FORMAT = 1  # bump when the meaning of a cached figure changes
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")


def cache_root() -> Path:
    """$SFLAM_CACHE, else $XDG_CACHE_HOME/sflam, else ~/.cache/sflam."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sflam"


def cache_dir() -> Path | None:
    """The cost cache's folder: $SFLAM_COST_CACHE, else <cache_root>/costs; None when SFLAM_COST_CACHE=off."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    if configured.lower() in ("off", "0", "none", "false"):
        return None
    return Path(configured).expanduser() if configured else cache_root() / "costs"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def parts_fingerprint(*modules: torch.nn.Module) -> str:
    """What the built parts are, without their values: module tree (layer sizes, LoRA ranks), every
    parameter's name, shape, dtype, class and trainability, and the quantization type of 4-bit weights."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(repr(module).encode())
        for name, param in module.named_parameters():
            state = getattr(param, "quant_state", None)
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{type(param).__name__}|{param.requires_grad}|"
                          f"{getattr(state, 'quant_type', '')}|{getattr(param, 'blocksize', '')}".encode())
    return digest.hexdigest()


def cache_key(kind: str, fields: dict[str, Any]) -> str:
    """The entry name for `fields` (JSON-able; anything else by its str) and the library versions."""
    payload = {"kind": kind, "format": FORMAT, "fields": fields,
               "versions": {name: _version(name) for name in LIBRARIES}}
    text = json.dumps(payload, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:40]}"


class CostCache:
    """One cache entry: a JSON object read once and rewritten atomically with every update."""

    def __init__(self, kind: str, fields: dict[str, Any], folder: Path | None = None) -> None:
        self.key = cache_key(kind, fields)
        folder = folder if folder is not None else cache_dir()
        self.path = None if folder is None else folder / f"{self.key}.json"
        self.fields = fields

    def load(self) -> dict[str, Any]:
        """The entry's contents; {} when absent, unreadable or not the entry for this key."""
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("key") != self.key or not isinstance(data.get("value"), dict):
            return {}
        return data["value"]

    def save(self, value: dict[str, Any]) -> None:
        """Write the entry atomically; a cache that cannot be written only costs the next start its time."""
        if self.path is None:
            return
        try:
            write_text(self.path, json.dumps({"key": self.key, "fields": self.fields, "value": value},
                                             sort_keys=True, default=str, indent=1))
        except OSError:
            pass


def cost_fields(config: ExperimentConfig, *parts: torch.nn.Module) -> dict[str, Any]:
    """What the FLOP table and the device memory of built parts depend on, for their cache key: the model,
    task, cut layer, weight mode, LoRA, and the parts' own structure (which covers label heads, image sizes
    and any other setting that changes a layer)."""
    m = config.model
    fields = {"model": m.name, "task": m.task, "image_size": m.image_size,
              "cut_layer": config.split.cut_layer, "weights": config.quant.weights,
              "lora": {"rank": config.lora.rank, "alpha": config.lora.alpha,
                       "targets": list(config.lora.target_modules), "server": config.lora.server},
              "parts": parts_fingerprint(*parts)}
    if config.split.head != "server":  # a U-shaped split counts the server to its features and the head apart
        fields["head"] = config.split.head
    return fields
