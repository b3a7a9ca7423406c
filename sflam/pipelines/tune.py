"""`sflam compare --tune`: each method's own learning rates, from an Optuna study on validation data
(docs/how-to/compare.md#tuned-comparisons).

Per method, one single-objective study maximises the final validation accuracy of a shortened run
(`tune.rounds`) over the knobs of `tune.knobs` the method has, each on a log scale over
[`tune.lr_low`, `tune.lr_high`]. A trial is an ordinary run of the method with `data.evaluate_on=validation`:
the devices' shards leave the validation samples out, evaluation reads only them, and the test split is never
built. Each study is a child MLflow run of the comparison ("tune <method>") with its trials as its children;
`tune.json` beside compare.json keeps every trial and the values chosen.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from sflam.pipelines.baselines import RUNNERS, method_config
from sflam.pipelines.train import train
from sflam.platform.config import ExperimentConfig, config_from_dict
from sflam.platform.errors import SflamError
from sflam.platform.files import write_text
from sflam.platform.tracking import Tracker
from sflam.search.trials import trial_tags

KNOB_KEYS = {"device_lr": "train.device_lr", "server_lr": "train.server_lr"}
WITHOUT_SERVER = ("fl",)  # the whole model trains on the device: no server part, no server learning rate


def method_knobs(config: ExperimentConfig, method: str) -> list[str]:
    """The knobs of `tune.knobs` a method has."""
    return [k for k in config.tune.knobs if not (k == "server_lr" and method in WITHOUT_SERVER)]


def with_values(config: ExperimentConfig, values: dict[str, float]) -> ExperimentConfig:
    """The config with the knobs set to these values."""
    return config_from_dict(config.to_dict(), {KNOB_KEYS[k]: v for k, v in values.items()})


def trial_config(config: ExperimentConfig, method: str, values: dict[str, float], number: int | None = None
                 ) -> ExperimentConfig:
    """A trial: the method's run at the drawn values, shortened to the trial rounds, evaluated once at its end on the
    validation samples (without a number: the study's own settings, as its MLflow run records them)."""
    rounds = config.tune.trial_rounds(config.train.rounds)
    tree = method_config(config, method).to_dict()
    tree["name"] = f"{tree['name']}-trial{number}" if number is not None else f"{tree['name']}-tune"
    return config_from_dict(tree, {"data.evaluate_on": "validation", "train.rounds": rounds,
                                   "train.eval_every": rounds, **{KNOB_KEYS[k]: v for k, v in values.items()}})


@dataclass
class Tuned:
    """One method's study: the chosen values (its best trial's) and every trial."""

    method: str
    values: dict[str, float]
    best_trial: int
    best_validation_accuracy: float
    study: str
    mlflow_run_id: str | None
    trials: list[dict[str, Any]] = field(default_factory=list)

    def columns(self) -> dict[str, float]:
        """The compare table's columns: `tuned_device_lr`, `tuned_server_lr`."""
        return {f"tuned_{k}": v for k, v in self.values.items()}

    def apply(self, config: ExperimentConfig) -> ExperimentConfig:
        return with_values(config, self.values)


def settings(config: ExperimentConfig) -> dict[str, Any]:
    """What a study's outcome depends on besides the method: a tune.json made under other settings is not reused."""
    return {**dataclasses.asdict(config.tune), "trial_rounds": config.tune.trial_rounds(config.train.rounds),
            "validation_fraction": config.data.validation_fraction, "seed": config.seed}


def _sampler(config: ExperimentConfig) -> optuna.samplers.BaseSampler:
    tune = config.tune
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tune.seed)
    return optuna.samplers.TPESampler(seed=tune.seed, n_startup_trials=max(1, tune.trials // 2))


def tune_method(config: ExperimentConfig, method: str, parent_run_id: str | None, target: Path,
                say: Callable[[str], None]) -> Tuned:
    """One method's study, trial after trial in this process (an in-memory Optuna study: tune.json and MLflow keep
    the trials)."""
    tune, knobs = config.tune, method_knobs(config, method)
    name = f"{config.name}-tune-{method}"
    experiment = config.tracking.experiment or config.name
    tracker = Tracker(trial_config(config, method, {}), run_name=f"tune {method}", parent_run_id=parent_run_id,
                      experiment=experiment, tags={"sflam.pipeline": "tune", "sflam.method": method,
                                                   "optuna.study": name})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, direction="maximize", sampler=_sampler(config))
    try:
        for k in range(tune.trials):
            trial = study.ask()
            values = {knob: trial.suggest_float(knob, tune.lr_low, tune.lr_high, log=True) for knob in knobs}
            drawn = ", ".join(f"{knob}={v:.3g}" for knob, v in values.items())
            try:
                result = train(trial_config(config, method, values, trial.number), run_name=f"trial-{trial.number}",
                               parent_run_id=tracker.run_id, out_dir=target / "tune" / method / f"trial{trial.number}",
                               runner=RUNNERS.get(method), experiment_name=experiment,
                               tags=trial_tags(name, trial, None))
                if result.accuracy is None:
                    raise SflamError("the trial was never evaluated")
            except Exception as exc:  # a diverging learning rate fails its trial, not the comparison
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                trial.set_user_attr("error", f"{type(exc).__name__}: {first}")
                study.tell(trial, state=TrialState.FAIL)
                say(f"tune {method}: trial {k + 1}/{tune.trials}: {drawn} -> FAIL ({type(exc).__name__}: {first})")
                continue
            trial.set_user_attr("mlflow_run_id", result.mlflow_run_id)
            study.tell(trial, float(result.accuracy))
            say(f"tune {method}: trial {k + 1}/{tune.trials}: {drawn} -> validation accuracy {result.accuracy:.4f} "
                f"(best {study.best_value:.4f})")
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            last = study.trials[-1].user_attrs.get("error")
            raise SflamError(f"tune {method}: all {tune.trials} trials failed (the last: {last}); see tune/{method}/ "
                             f"in {target}, or narrow tune.lr_low..tune.lr_high ({tune.lr_low:g}..{tune.lr_high:g})")
    except BaseException:
        tracker.close("FAILED")
        raise
    best = study.best_trial
    tuned = Tuned(method, {k: float(best.params[k]) for k in knobs}, best.number, float(study.best_value), name,
                  tracker.run_id, [_trial_row(t) for t in study.trials])
    tracker.log_params({f"tuned.{k}": repr(v) for k, v in tuned.values.items()})
    tracker.set_tags({"sflam.best_trial": str(best.number)})
    tracker.log_metrics({"best_validation_accuracy": tuned.best_validation_accuracy,
                         "trials_completed": len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))},
                        step=0)
    tracker.close("FINISHED")
    say(f"tune {method}: best trial {best.number}: " + ", ".join(f"{k}={v:.3g}" for k, v in tuned.values.items())
        + f" (validation accuracy {tuned.best_validation_accuracy:.4f})")
    return tuned


def _trial_row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {"number": trial.number, "state": trial.state.name, "params": dict(trial.params),
            "validation_accuracy": trial.value, "mlflow_run_id": trial.user_attrs.get("mlflow_run_id"),
            "error": trial.user_attrs.get("error")}


def tune_methods(config: ExperimentConfig, methods: tuple[str, ...], parent_run_id: str | None, target: Path,
                 say: Callable[[str], None], resume: bool = False) -> dict[str, Tuned]:
    """Every method's study, recorded in target/tune.json after each method; with `resume`, the methods tune.json
    already holds under the same settings are taken from it."""
    path = target / "tune.json"
    wanted = settings(config)
    done: dict[str, Tuned] = {}
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == json.loads(json.dumps(wanted)):
            done = {m: Tuned(**entry) for m, entry in saved["methods"].items() if m in methods}
    rounds = wanted["trial_rounds"]
    say(f"tuning {', '.join(methods)}: {config.tune.trials} trials each of {rounds} round(s), "
        f"{', '.join(config.tune.knobs)} in [{config.tune.lr_low:g}, {config.tune.lr_high:g}] (log scale), on "
        f"{config.data.validation_fraction:g} of the training split held out for validation")
    tuned: dict[str, Tuned] = {}
    for method in methods:
        if method in done:
            tuned[method] = done[method]
            say(f"tune {method}: from {path}: " + ", ".join(f"{k}={v:.3g}" for k, v in done[method].values.items()))
        else:
            tuned[method] = tune_method(config, method, parent_run_id, target, say)
        write_text(path, json.dumps({"settings": wanted,
                                     "methods": {m: dataclasses.asdict(t) for m, t in tuned.items()}}, indent=2) + "\n")
    return tuned
