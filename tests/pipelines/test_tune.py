"""`sflam compare --tune`: each method's learning rates from a study on validation data, never the test set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sflam import cli
from sflam.pipelines.compare import run_compare
from sflam.pipelines.train import train
from sflam.pipelines.tune import tune_methods
from sflam.platform import build, models
from sflam.platform.build import prepare_data, validate
from sflam.platform.data import TokenizedData, synthetic
from tests.conftest import ROOT, tiny_config

pytestmark = pytest.mark.integration


def held_out_positions(n: int = 600, fraction: float = 0.1, seed: int = 1234) -> np.ndarray:
    """The test split as data.split_seed defines it (the first share of its permutation), written here independently
    of the code under test and checked against the bundle below."""
    return np.sort(np.random.default_rng(seed).permutation(n)[: max(1, round(fraction * n))])


TEST_INDICES = held_out_positions()


def captured_synthetic(monkeypatch: pytest.MonkeyPatch, poison: bool = False) -> list[TokenizedData]:
    """The synthetic task as the pipeline loads it, kept (its sequences are the identity of its samples); with
    `poison`, every label of the test split flipped."""
    seen: list[TokenizedData] = []

    def load(cfg, seed, max_length):
        data = synthetic(cfg, seed, max_length)
        if poison:
            labels = data.labels.copy()
            labels[TEST_INDICES] = 1 - labels[TEST_INDICES]
            data = TokenizedData(data.input_ids, labels)
        seen.append(data)
        return data

    monkeypatch.setattr(build, "synthetic", load)
    return seen


def original_indices(data: TokenizedData, part: TokenizedData, rows: Any = None) -> set[int]:
    """Which samples of the loaded data a subset holds (subsets share the sequences' list objects)."""
    where = {id(seq): i for i, seq in enumerate(data.input_ids)}
    picked = part.input_ids if rows is None else [part.input_ids[r] for r in rows]
    return {where[id(seq)] for seq in picked}


def test_validation_samples_leave_every_shard_and_the_test_split_is_not_built(monkeypatch) -> None:
    seen = captured_synthetic(monkeypatch)
    config = tiny_config("data.evaluate_on=validation", "data.validation_fraction=0.2")
    bundle = prepare_data(config, validate(config))
    data = seen[-1]
    test = set(TEST_INDICES.tolist())
    held = original_indices(data, bundle.test)
    shards = [original_indices(data, bundle.train, shard) for shard in bundle.shards]
    trained = set().union(*shards)
    assert bundle.evaluated_on == "validation"
    assert len(held) == round(0.2 * (600 - len(test))) == len(bundle.test)
    assert not held & test  # evaluation reads validation samples, none of the test split
    assert all(not shard & held and not shard & test for shard in shards)  # no device trains on either
    assert trained | held | test == set(range(600)) and len(trained) == 600 - len(test) - len(held)
    # evaluated on the test split (the seeds of a comparison): exactly the test split, and the validation samples
    # are trained on again
    plain = tiny_config()
    bundle = prepare_data(plain, validate(plain))
    assert original_indices(seen[-1], bundle.test) == test
    assert set().union(*(original_indices(seen[-1], bundle.train, s) for s in bundle.shards)) == trained | held


def test_tuning_never_reads_the_test_set(monkeypatch, tmp_path: Path) -> None:
    config = tiny_config(f"output_dir={tmp_path}", "tracking.enabled=false", "train.rounds=2", "tune.rounds=1",
                         "tune.trials=3")
    # the poison is live: evaluated on the test split, a run's accuracy turns into its complement
    scores = []
    for poison in (False, True):
        captured_synthetic(monkeypatch, poison)
        run = tiny_config(f"output_dir={tmp_path}", "tracking.enabled=false", "train.rounds=1", "train.eval_every=1")
        scores.append(train(run, out_dir=tmp_path / f"control-{poison}").accuracy)
    assert scores[1] == pytest.approx(1 - scores[0], abs=1e-12) and abs(scores[0] - 0.5) > 0.05
    studies = []
    for poison in (False, True):
        captured_synthetic(monkeypatch, poison)
        tuned = tune_methods(config, ("sfl",), None, tmp_path / f"tune-{poison}", lambda text: None)["sfl"]
        studies.append((tuned.values, [(t["params"], t["validation_accuracy"]) for t in tuned.trials]))
    assert len({a for _, a in studies[0][1]}) > 1  # trials that differ: a flipped objective would pick another
    assert studies[1] == studies[0]


@pytest.fixture(scope="module")
def tuned_compare(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tuned")
    config = tiny_config(f"output_dir={root}", "train.rounds=2", "train.eval_every=2", "tune.rounds=1",
                         "tune.trials=3", "tune.sampler=random")
    lines: list[str] = []
    result = run_compare(config, methods=("fl", "sfl"), seeds=2, tune=True, announce=lines.append)
    target = root / f"{config.name}-compare"
    return {"config": config, "result": result, "lines": lines, "target": target,
            "tune": json.loads((target / "tune.json").read_text()),
            "client": MlflowClient(f"sqlite:///{root / 'mlflow.db'}")}


def test_tuned_values_are_the_best_trials_and_the_seeds_run_at_them(tuned_compare) -> None:
    tune, target = tuned_compare["tune"], tuned_compare["target"]
    rows = {r["method"]: r for r in tuned_compare["result"].rows}
    assert list(tune["methods"]) == ["fl", "sfl"]
    for method, study in tune["methods"].items():
        done = [t for t in study["trials"] if t["state"] == "COMPLETE"]
        assert len(study["trials"]) == 3 and done
        best = max(done, key=lambda t: t["validation_accuracy"])  # the first of equals, as Optuna picks
        assert study["best_trial"] == best["number"]
        assert study["best_validation_accuracy"] == best["validation_accuracy"]
        assert study["values"] == best["params"]
        assert set(best["params"]) == ({"device_lr"} if method == "fl" else {"device_lr", "server_lr"})
        assert rows[method]["tuned_device_lr"] == best["params"]["device_lr"]
        assert rows[method].get("tuned_server_lr") == best["params"].get("server_lr")
        server_lr = best["params"].get("server_lr", tuned_compare["config"].train.server_lr)  # fl: the config's
        for seed in (0, 1):  # every seed at the best trial's rates, on the full rounds, evaluated on the test split
            used = yaml.safe_load((target / f"seed{seed}" / method / "config.yaml").read_text())
            assert used["train"]["device_lr"] == best["params"]["device_lr"]
            assert used["train"]["server_lr"] == server_lr
            assert (used["train"]["rounds"], used["data"]["evaluate_on"]) == (2, "test")
        trial = yaml.safe_load((target / "tune" / method / f"trial{best['number']}" / "config.yaml").read_text())
        assert (trial["train"]["rounds"], trial["data"]["evaluate_on"]) == (1, "validation")
    saved = json.loads((target / "compare.json").read_text())
    assert [r["tuned_device_lr"] for r in saved] == [rows["fl"]["tuned_device_lr"], rows["sfl"]["tuned_device_lr"]]
    assert "tuned device lr" in (target / "compare.md").read_text()
    # progress: one line per trial with its value
    assert sum("tune sfl: trial" in line and "validation accuracy" in line for line in tuned_compare["lines"]) == 3


def test_each_study_records_its_trials_as_child_runs(tuned_compare) -> None:
    client, tune = tuned_compare["client"], tuned_compare["tune"]
    parent = client.get_run(tuned_compare["result"].parent_run_id)

    def children(run_id: str) -> list[Any]:
        return client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")

    members = {c.info.run_name: c for c in children(parent.info.run_id)}
    assert set(members) == {"tune fl", "tune sfl", "fl-seed0", "fl-seed1", "sfl-seed0", "sfl-seed1"}
    for method, study in tune["methods"].items():
        run = members[f"tune {method}"]
        assert run.info.run_id == study["mlflow_run_id"]
        assert {k: float(v) for k, v in run.data.params.items() if k.startswith("tuned.")} == {
            f"tuned.{k}": v for k, v in study["values"].items()}
        trials = {int(c.data.tags["optuna.trial_number"]): c for c in children(run.info.run_id)}
        assert sorted(trials) == [t["number"] for t in study["trials"]]
        for t in study["trials"]:
            recorded = trials[t["number"]]
            assert recorded.info.run_id == t["mlflow_run_id"]
            assert recorded.data.params["data.evaluate_on"] == "validation"
            for knob, value in t["params"].items():
                assert float(recorded.data.params[f"train.{knob}"]) == value
            assert recorded.data.metrics["final_accuracy"] == t["validation_accuracy"]
        for seed in (0, 1):  # the seeds' own runs carry the chosen values as their params
            seeded = members[f"{method}-seed{seed}"]
            assert float(seeded.data.params["train.device_lr"]) == study["values"]["device_lr"]
            assert seeded.data.tags["sflam.tuned_by"] == study["mlflow_run_id"]
    assert "tune.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_resume_takes_the_studies_from_tune_json(tuned_compare, monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("a finished study was run again")

    monkeypatch.setattr("sflam.pipelines.tune.train", no_training)
    config, target = tuned_compare["config"], tuned_compare["target"]
    again = tune_methods(config, ("fl", "sfl"), None, target, lambda text: None, resume=True)
    saved = tuned_compare["tune"]["methods"]
    assert {m: t.values for m, t in again.items()} == {m: s["values"] for m, s in saved.items()}


BAD = [
    (["tune.trials=0"], "tune.trials=0"),
    (["tune.rounds=-1"], "tune.rounds=-1"),
    (["tune.rounds=50"], "tune.rounds=50"),  # longer than the run it shortens
    (["tune.lr_low=0"], "tune.lr_low=0.0"),
    (["tune.lr_high=1e-5"], "tune.lr_high=1e-05"),
    (["tune.knobs=[momentum]"], "tune.knobs='momentum'"),
    (["tune.knobs=[]"], "tune.knobs=[]"),
    (["tune.sampler=grid"], "tune.sampler='grid'"),
    (["data.evaluate_on=train"], "data.evaluate_on='train'"),
    (["data.validation_fraction=1"], "data.validation_fraction=1.0"),
]


@pytest.mark.parametrize(("overrides", "names"), BAD, ids=[b[1] for b in BAD])
def test_tune_config_errors_are_one_line_before_any_work(overrides, names, capsys, monkeypatch) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the config was rejected")

    monkeypatch.setattr(models, "load_model", no_work)
    monkeypatch.setattr("sflam.pipelines.compare.run_compare", no_work)
    status = cli.main(["compare", "--tune", "-c", str(ROOT / "configs" / "smoke.yaml"), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1, err
    assert names in err[0] and "invalid" in err[0]
