"""Optuna studies: real trials as MLflow child runs, resume, failing trials, shared storage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from sflam.platform.config import load_config
from sflam.search.study import open_storage, run_study

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "study-smoke.yaml"


def small(tmp_path: Path, *extra: str):
    return load_config(SMOKE, [f"output_dir={tmp_path}", "train.rounds=2", "train.eval_every=1",
                               "data.synthetic_samples=400", *extra])


def test_a_study_runs_and_every_trial_has_its_child_run(tmp_path: Path) -> None:
    config = small(tmp_path, "study.trials=3")
    result = run_study(config)
    study = optuna.load_study(study_name="study-smoke", storage=result.storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(study.trials) == 3 and complete
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for trial in complete:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        for key, value in trial.params.items():
            assert run.data.params[key] == str(value)
        assert float(run.data.metrics["final_accuracy"]) == pytest.approx(trial.values[0])
    assert result.front and {"trial", "accuracy", "energy_j"} <= set(result.front[0])
    assert {p.name for p in result.plots} == {"pareto_front.png", "param_importances.png"}
    names = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"pareto.csv", "pareto.md", "pareto_front.png"} <= names


def test_resume_adds_trials_and_a_new_study_name_is_required_without_it(tmp_path: Path) -> None:
    from sflam.platform.errors import ConfigError

    config = small(tmp_path, "study.trials=2")
    run_study(config)
    with pytest.raises(ConfigError, match="--resume"):
        run_study(config)
    result = run_study(config, resume=True)
    assert result.trials == 4


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    # tiny-llama has 4 layers: cut layer 9 is invalid and fails its trial
    config = small(tmp_path, "study.trials=4", "study.sampler=random", "study.seed=2",
                   "study.space={split.cut_layer: {type: categorical, choices: [1, 9]}}")
    result = run_study(config)
    states = [t.state for t in optuna.load_study(study_name="study-smoke", storage=result.storage).trials]
    assert optuna.trial.TrialState.FAIL in states and optuna.trial.TrialState.COMPLETE in states
    assert len(states) == 4


def test_single_objective_reports_every_evaluated_round(tmp_path: Path) -> None:
    config = small(tmp_path, "study.trials=2", "study.objectives=[accuracy]",
                   "study.space={allocation.lam: {type: float, low: 0.1, high: 0.9}}")
    result = run_study(config)
    study = optuna.load_study(study_name="study-smoke", storage=result.storage)
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == [1, 2]


def test_two_processes_sharing_a_journal_storage_get_unique_trial_numbers(tmp_path: Path) -> None:
    journal = tmp_path / "shared.log"
    command = [sys.executable, "-m", "sflam", "study", "-c", str(SMOKE), f"output_dir={tmp_path}",
               f"study.storage={journal}", "study.trials=2", "train.rounds=1", "train.eval_every=1",
               "study.space={allocation.lam: {type: float, low: 0.1, high: 0.9}}", "--resume"]
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="study-smoke", storage=open_storage(str(journal)))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2, 3]


def test_parallel_trials_run_as_ray_tasks_and_the_driver_records_them(tmp_path: Path) -> None:
    import ray

    from sflam.actors.runtime import start_watchdog
    from sflam.cluster.connect import start_ray

    start_ray(None, num_cpus=2)  # a fresh loopback cluster the study joins, as `ray start` would give it
    watchdog = start_watchdog()  # pytest killed: the cluster's agents go with it
    try:
        result = run_study(small(tmp_path, "study.trials=3", "study.parallel=2"))
    finally:
        ray.shutdown()
        watchdog.terminate()
        watchdog.wait()
    study = optuna.load_study(study_name="study-smoke", storage=result.storage)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    for trial in complete:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert len(client.get_metric_history(run.info.run_id, "energy_j")) == 2


def test_leakage_and_epsilon_are_objectives_of_a_study(tmp_path: Path) -> None:
    # the accuracy–privacy front over the cut layer and the noise: each trial's values are its run's measured
    # leakage (the monitoring attack's token accuracy in the last measured round) and its (epsilon, delta) bound
    space = ("study.space={split.cut_layer: {type: categorical, choices: [0, 2]}, "
             "privacy.noise_sigma: {type: categorical, choices: [0.5, 4.0]}}")
    config = small(tmp_path, "study.trials=3", "study.sampler=random", "study.seed=1", space,
                   "study.objectives=[accuracy, leakage, privacy_epsilon]", "privacy.evaluate_every=2",
                   "privacy.clip_norm=10", "privacy.monitor_aux_samples=100", "privacy.victims=8")
    result = run_study(config)
    study = optuna.load_study(study_name="study-smoke", storage=result.storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for trial in complete:
        metrics = client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics
        assert 0 <= trial.values[1] <= 1 and trial.values[1] == pytest.approx(metrics["leakage"])
        assert trial.values[2] > 0
    # more noise, a smaller epsilon: the accountant's bound is monotone in sigma
    by_sigma = {t.params["privacy.noise_sigma"]: t.values[2] for t in complete}
    if len(by_sigma) == 2:
        assert by_sigma[4.0] < by_sigma[0.5]
    assert result.front and {"leakage", "privacy_epsilon"} <= set(result.front[0])
