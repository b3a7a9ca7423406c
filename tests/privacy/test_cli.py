"""`sflam attack`: the report files, the table, the threat model and labels statement; bad privacy values rejected
in one line before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sflam import cli
from sflam.platform import models
from sflam.privacy.accounting import epsilon

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["privacy.aux_samples=200", "privacy.inverse_steps=20", "privacy.optimisation_steps=10", "privacy.victims=4",
         "tracking.enabled=false"]


def test_attack_writes_the_report_and_prints_the_table(tmp_path: Path, capsys) -> None:
    status = cli.main(["attack", "-c", str(ROOT / "configs" / "smoke.yaml"), *SMALL, f"output_dir={tmp_path}",
                       "privacy.clip_norm=40", "privacy.noise_sigma=0.01", "--json", str(tmp_path / "out.json")])
    captured = capsys.readouterr()
    assert status == 0
    assert "labels are sent in the clear to the server" in captured.err.lower()
    table = captured.out.splitlines()
    assert table[0].split()[:3] == ["attack", "token_accuracy", "rouge_l"]
    assert [line.split()[0] for line in table[2:5]] == ["linear", "inverse-model", "white-box"]
    assert "(epsilon, delta)" in captured.out
    folder = tmp_path / "smoke"
    report = json.loads((folder / "privacy.json").read_text())
    assert report == json.loads((tmp_path / "out.json").read_text())
    assert report["labels"] == "sent in the clear to the server"
    assert "honest-but-curious" in report["threat_model"]
    assert [a["name"] for a in report["attacks"]] == ["linear", "inverse-model", "white-box"]
    assert all(0 <= a["metrics"]["token_accuracy"] <= 1 and a["wall_s"] >= 0 for a in report["attacks"])
    assert report["attacks"][1]["budgets"]["inverse_steps"] == 20
    assert report["auxiliary"] == {"source": "train split", "samples": 200, "seed": 0}
    assert report["victims"]["source"] == "test split" and report["victims"]["samples"] == 4
    # smoke: 4 rounds of 2 local steps of 8 samples; a shard of fewer than 16 samples draws some sample twice a round
    assert report["dp"]["noise_multiplier"] == 0.005 and report["dp"]["releases"] == 4 * 2
    assert report["dp"]["epsilon"] == pytest.approx(epsilon(0.01, 8, 1e-5))
    markdown = (folder / "privacy.md").read_text()
    assert "**Labels are sent in the clear to the server" in markdown and "Threat model" in markdown
    assert markdown.count("| original |") == 4  # every victim's sentence beside the reconstructions


def test_attack_on_images_draws_the_reconstructions(tmp_path: Path, capsys) -> None:
    status = cli.main(["attack", "-c", str(ROOT / "configs" / "smoke-vit.yaml"), *SMALL, f"output_dir={tmp_path}"])
    assert status == 0
    folder = tmp_path / "smoke-vit"
    assert (folder / "privacy.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((folder / "privacy.json").read_text())
    assert set(report["attacks"][0]["metrics"]) == {"ssim", "psnr_db", "ssim_original", "psnr_original_db"}
    assert report["dp"] is None and "privacy.png" in (folder / "privacy.md").read_text()
    assert capsys.readouterr().out.splitlines()[0].split()[1] == "ssim"


BAD = [
    (["privacy.attacks=[linear, nosuch]"], "privacy.attacks='nosuch'"),
    (["privacy.attacks=[]"], "privacy.attacks=[]"),
    (["privacy.victims=0"], "privacy.victims=0"),
    (["privacy.aux_samples=-3"], "privacy.aux_samples=-3"),
    (["privacy.noise_sigma=0.5"], "privacy.clip_norm=0.0"),
    (["privacy.noise_sigma=-1", "privacy.clip_norm=1"], "privacy.noise_sigma=-1.0"),
    (["privacy.delta=1"], "privacy.delta=1.0"),
    (["privacy.evaluate_every=-1"], "privacy.evaluate_every=-1"),
    (["privacy.nopeek_weight=.nan"], "privacy.nopeek_weight=nan"),
]


@pytest.mark.parametrize(("overrides", "names"), BAD, ids=[b[1] for b in BAD])
def test_bad_privacy_values_exit_2_with_one_line_before_any_model_loads(overrides, names, capsys, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was rejected")

    monkeypatch.setattr(models, "load_model", no_loading)
    status = cli.main(["attack", "-c", str(ROOT / "configs" / "smoke.yaml"), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1, err
    assert names in err[0] and "invalid" in err[0]
