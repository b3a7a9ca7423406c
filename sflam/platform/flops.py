"""FLOPs of the device part and the server part per sample, counted on the real split model by input shape.

FLOPs are counted with torch's FlopCounterMode on the real parts (per input shape, cached on disk). The counter
does not see bitsandbytes' 4-bit matmul, so every quantized linear layer is checked during the count: where the
counter saw less than its 2·in·out multiply-adds per token, the difference is added (a quantized layer still does
the full product after dequantization; dequantization itself is a table lookup and scale, not counted).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from sflam.platform.cache import CostCache
from sflam.platform.data import BatchShape
from sflam.platform.quantization import bnb
from sflam.platform.strategies import truncated

QUANTIZED_LINEARS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def _count(fn, module: torch.nn.Module | None = None) -> int:
    """FLOPs of fn() as FlopCounterMode counts them, plus the quantized matmuls it cannot see."""
    missing = [0]
    handles = []
    with FlopCounterMode(display=False) as counter:
        if module is not None:
            for sub in module.modules():
                if isinstance(sub, QUANTIZED_LINEARS):
                    handles.append(sub.register_forward_pre_hook(lambda m, a: setattr(m, "_sflam_seen",
                                                                                      counter.get_total_flops())))
                    handles.append(sub.register_forward_hook(
                        lambda m, a, out: missing.__setitem__(0, missing[0] + max(
                            0, 2 * m.in_features * m.out_features * (a[0].numel() // m.in_features)
                            - (counter.get_total_flops() - m._sflam_seen)))))
        try:
            fn()
        finally:
            for handle in handles:
                handle.remove()
    return int(counter.get_total_flops()) + missing[0]


def _sample(shape: BatchShape) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample at a mini-batch's padded input shape, every position real (the compute does not depend on the
    values): token ids for text, pixels for images."""
    if len(shape.input_shape) == 1:
        inputs = torch.ones((1, *shape.input_shape), dtype=torch.long)
    else:
        inputs = torch.zeros((1, *shape.input_shape), dtype=torch.float32)
    return inputs, torch.ones((1, *shape.mask_shape), dtype=torch.long)


class FlopTable:
    """Forward and backward FLOPs per sample of the device part and the server part, by input shape."""

    def __init__(self, device_part: torch.nn.Module, server_part: torch.nn.Module, adapter: dict[str, torch.Tensor],
                 hidden_size: int, cache: CostCache | None = None, head_part: torch.nn.Module | None = None) -> None:
        """`cache`: the on-disk entry of these parts (see `cost_fields`); counts found there are not redone,
        new ones are added to it."""
        self.device_part = device_part
        self.server_part = server_part
        self.adapter = adapter
        self.hidden_size = hidden_size
        self.cache = cache
        # a U-shaped split: the server runs its part to the features, the head runs on the device
        self.head_part = head_part
        self._device: dict[tuple[int, ...], tuple[int, int]] = {}
        self._server: dict[int, tuple[int, int]] = {}
        self._head: dict[int, tuple[int, int]] = {}
        self.cached = self._load()

    def _load(self) -> int:
        """Counts from the cache entry (a malformed one is ignored as a whole); how many were read."""
        if self.cache is None:
            return 0
        value = self.cache.load()
        try:
            device = {tuple(int(v) for v in key.split(",")): (int(f), int(b))
                      for key, (f, b) in value.get("device", {}).items()}
            server = {int(key): (int(f), int(b)) for key, (f, b) in value.get("server", {}).items()}
            head = {int(key): (int(f), int(b)) for key, (f, b) in value.get("head", {}).items()}
        except (TypeError, ValueError, AttributeError):
            return 0
        self._device.update(device)
        self._server.update(server)
        self._head.update(head)
        return len(device) + len(server) + len(head)

    def _save(self) -> None:
        if self.cache is not None:
            entry = {"device": {",".join(str(v) for v in key): list(fb) for key, fb in self._device.items()},
                     "server": {str(key): list(fb) for key, fb in self._server.items()}}
            if self._head:
                entry["head"] = {str(key): list(fb) for key, fb in self._head.items()}
            self.cache.save(entry)

    def device_batch(self, shape: BatchShape, rank: int | None = None) -> tuple[int, int]:
        """(forward, backward) FLOPs of one sample of a mini-batch (at its padded shape) through the device part,
        with the adapter at LoRA `rank` (None: the global adapter's; counted on the part with its LoRA factors cut
        to that rank)."""
        key = shape.input_shape + shape.mask_shape
        if rank is not None:
            key = (*key, -rank)  # a negative marker: shapes are positive, so a ranked key never equals another
        if key not in self._device:
            inputs, mask = _sample(shape)
            adapter = {n: t.detach().clone().requires_grad_(True)
                       for n, t in (self.adapter if rank is None else truncated(self.adapter, rank)).items()}
            out: list[torch.Tensor] = []

            def forward() -> None:
                with torch.enable_grad() if adapter else torch.no_grad():
                    out.append(torch.func.functional_call(self.device_part, adapter, (inputs, mask), strict=False))

            fwd = _count(forward, self.device_part)
            bwd = _count(lambda: out[0].backward(torch.ones_like(out[0])), self.device_part) if adapter else 0
            self._device[key] = (fwd, bwd)
            self._save()
        return self._device[key]

    def device(self, length: int) -> tuple[int, int]:
        """(forward, backward) FLOPs of one token sequence of `length` through the device part."""
        return self.device_batch(BatchShape(lengths=np.array([length]), input_shape=(length,), mask_shape=(length,)))

    def server(self, length: int) -> tuple[int, int]:
        """(forward, backward) FLOPs of one sample of `length` tokens through the server part."""
        if length not in self._server:
            hidden = torch.zeros((1, length, self.hidden_size), requires_grad=True)
            mask = torch.ones((1, length), dtype=torch.long)
            out: list[torch.Tensor] = []

            def forward() -> None:
                with torch.enable_grad():
                    part: Any = self.server_part
                    out.append((part.features if self.head_part is not None else part)(hidden, mask).sum())

            fwd = _count(forward, self.server_part)
            bwd = _count(lambda: out[0].backward(), self.server_part)
            self.server_part.zero_grad(set_to_none=True)
            self._server[length] = (fwd, bwd)
            self._save()
        return self._server[length]

    def head(self, width: int) -> tuple[int, int]:
        """(forward, backward) FLOPs of one sample through a U-shaped split's head on the device: its `width`
        features to the logits, and back to the features' gradient and the head's own."""
        assert self.head_part is not None
        if width not in self._head:
            features = torch.zeros((1, width), requires_grad=True)
            out: list[torch.Tensor] = []

            def forward() -> None:
                with torch.enable_grad():
                    out.append(self.head_part(features).sum())  # type: ignore[misc]

            fwd = _count(forward, self.head_part)
            bwd = _count(lambda: out[0].backward(), self.head_part)
            self.head_part.zero_grad(set_to_none=True)
            self._head[width] = (fwd, bwd)
            self._save()
        return self._head[width]
