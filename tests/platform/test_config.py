"""Configuration: every file in configs/ loads; overrides; every invalid value is one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sflam import cli
from sflam.platform import models
from sflam.platform.config import ExperimentConfig, load_config, parse_override
from sflam.platform.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    assert {"default.yaml", "smoke.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path: Path) -> None:
    from sflam.platform.build import validate

    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    spec = validate(config)
    assert 0 <= config.split.cut_layer <= spec.num_layers
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "a config starts with a header comment"
    header = path.read_text().split("\n\n")[0]
    assert "# Run: sflam " in header or "make run" in header, "the header says how to run it"


def test_default_config_is_the_issue_scenario() -> None:
    config = load_config(ROOT / "configs" / "default.yaml")
    assert (config.model.name, config.data.num_devices, config.data.dirichlet_alpha) == ("minilm-l6", 1000, 0.5)
    assert (config.train.devices_per_round, config.split.cut_layer, config.quant.weights) == (20, 1, "nf4")
    assert (config.quant.activation_bits, config.quant.gradient_bits, config.lora.rank) == (8, 8, 8)


def test_overrides_are_typed_and_flatten_back() -> None:
    config = load_config(None, ["split.cut_layer=3", "quant.activation_bits=4", "train.device_lr=1e-4",
                                "lora.target_modules=[q_proj, v_proj]", "name=x"])
    flat = config.to_flat()
    assert flat["split.cut_layer"] == 3 and flat["quant.activation_bits"] == 4
    assert flat["train.device_lr"] == pytest.approx(1e-4)
    assert flat["lora.target_modules"] == ["q_proj", "v_proj"]
    assert parse_override("a.b=2") == ("a.b", 2)
    # the flat dict round-trips through overrides
    again = load_config(None, [f"{k}={v}" for k, v in flat.items() if not isinstance(v, list) and v is not None])
    assert again.to_flat() == {**flat, "lora.target_modules": []}


TWO_CLASSES = ("devices.classes=[{name: small, share: 0.5, memory_mib: 9, clock_hz: [1.0e9, 1.0e9]},"
               "{name: big, share: 0.5, memory_mib: 90, clock_hz: [2.0e9, 2.0e9]}]")
BAD = [
    (["nosuch.key=1"], "nosuch"),
    (["train.batchsize=4"], "train.batchsize"),
    (["split.cut_layer=7"], "split.cut_layer=7"),
    (["split.cut_layer=-1"], "split.cut_layer=-1"),
    (["quant.activation_bits=17"], "quant.activation_bits=17"),
    (["quant.gradient_bits=0"], "quant.gradient_bits=0"),
    (["quant.weights=int4"], "quant.weights='int4'"),
    (["train.rounds=0"], "train.rounds=0"),
    (["train.batch_size=-2"], "train.batch_size=-2"),
    (["data.num_devices=0"], "data.num_devices=0"),
    (["train.devices_per_round=30", "data.num_devices=10"], "train.devices_per_round=30"),
    (["model.name=no-such-model"], "model.name='no-such-model'"),
    (["data.dataset=csv", "data.path=/no/such/file.csv"], "data.path='/no/such/file.csv'"),
    (["train.device_lr=fast"], "train.device_lr='fast'"),
    (["model.name=minilm-l6", "model.task=causal-lm"], "model.task='causal-lm'"),
    (["allocation.lam=1.5"], "allocation.lam=1.5"),
    (["allocation.policy=best"], "allocation.policy='best'"),
    (["allocation.bits=[4, 20]"], "allocation.bits=20"),
    (["allocation.deadline_s=0"], "allocation.deadline_s=0"),
    (["system.bandwidth_hz=-1"], "system.bandwidth_hz=-1"),
    (["system.max_distance_m=10"], "system.max_distance_m=10"),
    # non-finite numbers, LoRA targets that match nothing, and what used to fail only after loading
    (["allocation.lam=.inf"], "allocation.lam=inf"),
    (["system.max_power_w=.nan"], "system.max_power_w=nan"),
    (["train.device_lr=-.inf"], "train.device_lr=-inf"),
    (["lora.target_modules=[query, qkv]"], "lora.target_modules=['qkv']"),
    (["allocation.bits_search=exhaustive"], "allocation.bits_search='exhaustive'"),
    (["ray.workers=2", "ray.devices_per_worker=3"], "ray.devices_per_worker=3"),
    (["allocation.distortion_bits=0.5"], "allocation.distortion_bits=0.5"),
    (["allocation.bits=[4, 8]", "allocation.distortion_bits=3"], "allocation.distortion_bits=3.0"),
    (["system.access=tdma"], "system.access='tdma'"),
    (["system.access=ofdma", "system.subchannels=4"], "system.subchannels=4"),
    (["server.threads=-1"], "server.threads=-1"),
    # devices at several cuts (split.policy; tests/platform/test_split_policy.py has the rest)
    (["split.policy=deepest"], "split.policy='deepest' is invalid: one of fixed, memory, joint"),
    (["split.policy=memory", "split.candidates=[2]"], "split.candidates=[2] is invalid: two or more distinct cuts"),
    (["split.policy=memory", "split.candidates=[2,1]"], "split.candidates=[2, 1] is invalid: two or more distinct"),
    (["split.policy=memory", "split.candidates=[1,2]"],
     "split.policy='memory' is invalid: fixed without devices.classes"),
    ([TWO_CLASSES, "split.policy=joint", "split.candidates=[1,2]", "lora.server=false"],
     "lora.server=False is invalid: true with split.policy=joint"),
    ([TWO_CLASSES, "split.policy=joint", "split.candidates=[1,2]", "split.head=device"],
     "split.head='device' is invalid: server with split.policy=joint"),
    ([TWO_CLASSES, "split.policy=memory", "split.candidates=[1,2]", "runtime=ray", "server.engine=deepspeed"],
     "server.engine='deepspeed' is invalid: torch with split.policy=memory"),
]


@pytest.mark.parametrize(("overrides", "names"), BAD, ids=[b[1] for b in BAD])
def test_invalid_values_exit_2_with_one_line_before_any_model_loads(overrides, names, capsys, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was rejected")

    monkeypatch.setattr(models, "load_model", no_loading)
    status = cli.main(["run", "-c", str(ROOT / "configs" / "smoke.yaml"), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1, err
    assert names in err[0]
    assert "invalid" in err[0] or "unknown" in err[0]


def test_error_names_what_is_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["quant.activation_bits=40"])
    assert "1..16" in str(info.value) and "32" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.devices_per_round=2000"])
    assert "at most data.num_devices=1000" in str(info.value)


def test_cut_layer_range_comes_from_the_model(capsys) -> None:
    assert cli.main(["validate", str(ROOT / "configs" / "smoke.yaml"), "split.cut_layer=5"]) == 2
    assert "0..4" in capsys.readouterr().err  # tiny-bert has 4 layers
    assert cli.main(["validate", str(ROOT / "configs" / "default.yaml"), "split.cut_layer=6"]) == 0


def test_missing_config_file_and_bad_yaml(tmp_path, capsys) -> None:
    assert cli.main(["validate", str(tmp_path / "none.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    assert cli.main(["validate", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("config=" in line for line in lines)


def test_console_exit_status_and_no_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "sflam", "validate", "configs/smoke.yaml", "quant.weights=q3"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "fp32, bf16, int8, nf4, fp4" in proc.stderr


def test_an_impossible_deadline_stops_before_training(capsys) -> None:
    status = cli.main(["run", "-c", str(ROOT / "configs" / "smoke.yaml"), "allocation.deadline_s=1e-6",
                       "train.rounds=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert "deadline" in err[-1] and "round 1/" not in "\n".join(err)


def test_bad_seed_counts_are_usage_errors(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "-c", str(ROOT / "configs" / "smoke.yaml"), "--seeds", "0"])
    assert exit_info.value.code == 2
    assert "--seeds" in capsys.readouterr().err
