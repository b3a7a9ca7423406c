"""The on-disk cost cache: cached FLOP tables and device memory equal fresh measurements, keys follow the
settings they depend on, a damaged entry is measured again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sflam.platform import cache, flops, memory
from sflam.platform.assembly import build_runners
from sflam.platform.cache import CACHE_ENV, CostCache, cache_dir, cost_fields
from sflam.platform.data import batch_shape, collate
from sflam.platform.flops import FlopTable
from sflam.platform.memory import cached_device_memory, measure_device_memory
from tests.conftest import tiny_config

BASE = ("model.name=tiny-bert", "quant.weights=nf4", "split.cut_layer=1")


def _parts(*overrides: str):
    config = tiny_config(*BASE, *overrides)
    data, device, server = build_runners(config)
    return config, data, device, server


def _table(device, server, cache: CostCache | None) -> FlopTable:
    return FlopTable(device.part, server.part, device.initial_adapter(), int(device.part.config.hidden_size),
                     cache=cache)


def _count_all(table: FlopTable, data) -> list[tuple[int, int]]:
    batch = batch_shape(data.train, np.arange(8))
    return [table.device(16), table.device(24), table.server(16), table.device_batch(batch)]


def _no_counting(*args, **kwargs):
    raise AssertionError("counted again although the cache holds the figures")


def test_a_cached_flop_table_equals_a_fresh_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, data, device, server = _parts()
    fields = cost_fields(config, device.part, server.part)
    fresh = _count_all(_table(device, server, None), data)
    assert all(f > 0 and b > 0 for f, b in fresh)
    first = _table(device, server, CostCache("flops", fields, tmp_path))
    assert first.cached == 0 and _count_all(first, data) == fresh
    monkeypatch.setattr(flops, "_count", _no_counting)  # from here on every figure must come from the file
    again = _table(device, server, CostCache("flops", fields, tmp_path))
    assert again.cached == 4
    assert _count_all(again, data) == fresh


def test_cached_device_memory_equals_a_fresh_measurement(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    config, data, device, server = _parts()
    fields = cost_fields(config, device.part, server.part)
    adapter = device.initial_adapter()
    batch = collate(data.train, np.arange(8), data.pad_token_id)
    fresh = measure_device_memory(device.part, adapter, batch)
    assert fresh.peak > fresh.weights > 0
    assert cached_device_memory(config, device.part, adapter, batch, fields) == fresh
    assert len(list(tmp_path.glob("memory-*.json"))) == 1
    monkeypatch.setattr(memory, "measure_device_memory", _no_counting)
    assert cached_device_memory(config, device.part, adapter, batch, fields) == fresh
    # another batch is another step: never the cached figure
    other = collate(data.train, np.arange(8, 12), data.pad_token_id)
    with pytest.raises(AssertionError, match="counted again"):
        cached_device_memory(config, device.part, adapter, other, fields)


def test_the_key_changes_with_the_cut_and_the_weight_mode(tmp_path: Path) -> None:
    config, data, device, server = _parts()
    base = CostCache("flops", cost_fields(config, device.part, server.part), tmp_path)
    _count_all(_table(device, server, base), data)
    keys = {base.key}
    for overrides in (("split.cut_layer=2",), ("quant.weights=int8",), ("quant.weights=fp4",), ("lora.rank=4",)):
        other_config, other_data, other_device, other_server = _parts(*overrides)
        cache = CostCache("flops", cost_fields(other_config, other_device.part, other_server.part), tmp_path)
        assert cache.key not in keys, overrides
        keys.add(cache.key)
        table = _table(other_device, other_server, cache)
        assert table.cached == 0, overrides  # the cut-1 nf4 entry is never read for these parts
        assert _count_all(table, other_data) == _count_all(_table(other_device, other_server, None), other_data)
    # cut 2 runs one more block on the device: the stale cut-1 figures would have been wrong
    cut2 = _parts("split.cut_layer=2")
    assert _table(cut2[2], cut2[3], None).device(16)[0] == 2 * _table(device, server, None).device(16)[0]


@pytest.mark.parametrize("damage", ["{not json", '{"key": "other", "value": {"device": {"16": [1, 1]}}}', "[1, 2]",
                                    '{"key": "KEY", "value": {"device": {"16": ["x", 1]}}}'])
def test_a_damaged_entry_is_measured_again(tmp_path: Path, damage: str) -> None:
    config, data, device, server = _parts()
    fresh = _count_all(_table(device, server, None), data)
    cache = CostCache("flops", cost_fields(config, device.part, server.part), tmp_path)
    assert cache.path is not None
    cache.path.write_text(damage.replace("KEY", cache.key))
    table = _table(device, server, cache)
    assert table.cached == 0
    assert _count_all(table, data) == fresh
    written = json.loads(cache.path.read_text())  # rewritten whole, readable by the next start
    assert written["key"] == cache.key and len(written["value"]["device"]) == 3
    assert _table(device, server, CostCache("flops", cache.fields, tmp_path)).cached == 4


def test_damaged_memory_entry_is_measured_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    config, data, device, server = _parts()
    fields = cost_fields(config, device.part, server.part)
    adapter, batch = device.initial_adapter(), collate(data.train, np.arange(8), data.pad_token_id)
    fresh = cached_device_memory(config, device.part, adapter, batch, fields)
    (entry,) = tmp_path.glob("memory-*.json")
    stored = json.loads(entry.read_text())
    stored["value"]["peak"] = "many"
    entry.write_text(json.dumps(stored))
    assert cached_device_memory(config, device.part, adapter, batch, fields) == fresh
    assert json.loads(entry.read_text())["value"]["peak"] == fresh.peak


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here"
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_dir() is None and CostCache("flops", {}).path is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("SFLAM_CACHE", str(tmp_path / "sflam"))
    assert cache_dir() == tmp_path / "sflam" / "costs"
    monkeypatch.delenv("SFLAM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sflam" / "costs"


@pytest.mark.parametrize("library", ["torch", "transformers", "peft", "bitsandbytes"])
def test_a_changed_library_version_is_a_new_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   library: str) -> None:
    config, data, device, server = _parts()
    fields = cost_fields(config, device.part, server.part)
    first = CostCache("flops", fields, tmp_path)
    _count_all(_table(device, server, first), data)
    assert _table(device, server, CostCache("flops", fields, tmp_path)).cached == 4  # same versions: read back
    real = cache._version
    monkeypatch.setattr(cache, "_version", lambda name: real(name) + ".post9" if name == library else real(name))
    upgraded = CostCache("flops", fields, tmp_path)
    assert upgraded.key != first.key
    assert _table(device, server, upgraded).cached == 0  # the entry of the other version is never read
    assert len(list(tmp_path.glob("flops-*.json"))) == 1  # nothing counted yet under the new key: not written


def test_another_thread_count_is_a_new_memory_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    config, data, device, server = _parts()
    fields = cost_fields(config, device.part, server.part)
    adapter, batch = device.initial_adapter(), collate(data.train, np.arange(8), data.pad_token_id)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cached_device_memory(config, device.part, adapter, batch, fields)
        torch.set_num_threads(2)
        monkeypatch.setattr(memory, "measure_device_memory", _no_counting)
        with pytest.raises(AssertionError, match="counted again"):  # two threads: measured afresh, not read
            cached_device_memory(config, device.part, adapter, batch, fields)
        torch.set_num_threads(1)
        assert cached_device_memory(config, device.part, adapter, batch, fields) == one  # one thread: read back
    finally:
        torch.set_num_threads(threads)
    assert len(list(tmp_path.glob("memory-*.json"))) == 1
