"""The reference runtime runs a vision experiment end to end (docs/concepts/round-engine.md): tiny ViT on the 8x8
digits."""

from __future__ import annotations

from sflam.platform import codec
from sflam.platform.assembly import Experiment
from sflam.platform.config import load_config
from sflam.platform.local import run_local
from sflam.platform.participation import select_devices
from tests.conftest import ROOT


def test_vision_experiment_runs_and_learns(tmp_path) -> None:
    config = load_config(ROOT / "configs" / "smoke-vit.yaml", [
        f"output_dir={tmp_path}", "tracking.enabled=false", "allocation.policy=equal", "train.rounds=6",
        "train.eval_every=6", "data.eval_samples=200"])
    exp = Experiment.build(config)
    result = run_local(config, experiment=exp)
    assert len(result.rounds) == 6
    # every device sends 8-bit smashed data, 17 tokens (16 patches + CLS) of width 64 per image, and a
    # 32-bit header per image; nothing comes back at cut 0 (the device part has no adapter to train)
    steps, size = config.train.local_steps, config.train.batch_size
    for round_index, metrics in enumerate(result.rounds):
        selected = select_devices(config.seed, round_index, config.data.num_devices, config.train.devices_per_round)
        rows = [min(size, len(exp.data.shards[k])) for k in selected]
        expected = sum(steps * (codec.payload_bits(r * 17, 64, 8) + 32 * r) for r in rows)
        assert metrics.uplink_bits == expected
        assert metrics.downlink_bits == 0
    assert 0.3 < result.accuracy <= 1.0  # ten classes: chance is 0.1
