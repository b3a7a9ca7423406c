"""`sflam study`: design-space exploration with Optuna, every trial a child MLflow run (DESIGN §9).

Multi-objective by default (NSGA-II over accuracy up; round latency, device energy and device memory
down), single-objective by choice (then each round's value is reported and the median pruner stops
poor trials). Trials are asked and told: in this process one after another, or `study.parallel` at a
time as Ray tasks whose results the driver records in MLflow (only the driver talks to MLflow). The
storage is any SQLAlchemy URL or a journal file; a study resumes with --resume. At the end the Pareto
front is written as a table, and Optuna's plots of the front and of parameter importances as PNG files.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from sflam.cluster.connect import start_ray
from sflam.pipelines.train import record, run_experiment, train
from sflam.platform.build import validate
from sflam.platform.config import OBJECTIVES, ExperimentConfig
from sflam.platform.errors import ConfigError, SflamError
from sflam.platform.results import RoundMetrics, RunResult
from sflam.platform.tracking import Tracker
from sflam.search.space import check_space, suggest, trial_config

ROUND_VALUE = {"accuracy": "eval_accuracy", "loss": "eval_loss"}


@dataclass
class StudyResult:
    study_name: str
    storage: str
    trials: int
    front: list[dict[str, Any]]
    parent_run_id: str | None
    table_path: Path
    plots: list[Path]


def storage_url(config: ExperimentConfig) -> str:
    if config.study.storage:
        return config.study.storage
    root = Path(config.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'optuna.db'}"


def open_storage(url: str) -> Any:
    if url.endswith((".log", ".jsonl")) and "://" not in url:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    return url


def _sampler(config: ExperimentConfig) -> optuna.samplers.BaseSampler:
    study = config.study
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=study.seed)
    if study.sampler == "tpe" or len(study.objectives) == 1:
        return optuna.samplers.TPESampler(seed=study.seed, multivariate=True)
    return optuna.samplers.NSGAIISampler(seed=study.seed, population_size=max(4, min(20, study.trials)))


def open_study(config: ExperimentConfig, resume: bool) -> tuple[optuna.Study, str, str]:
    name = config.study.name or config.name
    url = storage_url(config)
    storage = open_storage(url)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if name in existing and not resume:
        raise ConfigError("study.name", name, f"a new study name, or --resume to add trials (it exists in {url})")
    directions: list[Any] = [OBJECTIVES[o] for o in config.study.objectives]
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
              if len(directions) == 1 and config.study.prune else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=name, storage=storage, directions=directions, sampler=_sampler(config),
                                pruner=pruner, load_if_exists=resume)
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError("study.objectives", config.study.objectives,
                          f"the objectives study {name} was created with ({len(study.directions)} directions)")
    return study, name, url


def _values(config: ExperimentConfig, result: RunResult) -> list[float]:
    summary = result.summary()
    values = []
    for objective in config.study.objectives:
        value = summary.get(objective)
        if value is None:
            raise SflamError(f"trial produced no {objective}")
        values.append(float(value))
    return values


def run_study(config: ExperimentConfig, resume: bool = False, announce: Callable[[str], None] | None = None,
              progress: Callable[[int, RoundMetrics], None] | None = None) -> StudyResult:
    say = announce or (lambda text: None)
    if not config.study.space:
        raise ConfigError("study.space", {}, "a mapping of dotted config keys to {type, low/high or choices}")
    check_space(config)
    study, name, url = open_study(config, resume)
    target = Path(config.output_dir) / f"{name}-study"
    target.mkdir(parents=True, exist_ok=True)
    parent = Tracker(config, run_name=f"{name}-study", tags={"sflam.pipeline": "study", "optuna.study": name,
                                                            "optuna.storage": url})
    before = len(study.trials)
    say(f"study {name} in {url}: {before} earlier trial(s), adding {config.study.trials}, objectives "
        f"{', '.join(config.study.objectives)}")
    try:
        if config.study.parallel > 1:
            _run_parallel(config, study, parent, target, say)
        else:
            for _ in range(config.study.trials):
                _run_one(config, study, parent, target, say, progress)
    except BaseException:
        parent.close("FAILED", spill_dir=target)
        raise
    front = pareto_rows(study, config)
    table_path = write_front(front, target / "pareto.csv")
    plots = plot_study(study, config, target)
    for path in [table_path, table_path.with_suffix(".md"), *plots]:
        parent.log_artifact(path)
    if front:
        parent.log_metrics({f"best_{o}": front[0][o] for o in config.study.objectives}, step=0)
    parent.close("FINISHED", spill_dir=target)
    return StudyResult(name, url, len(study.trials), front, parent.run_id, table_path, plots)


def _tags(name: str, number: int) -> dict[str, str]:
    return {"optuna.study": name, "optuna.trial_number": str(number)}


def _run_one(config: ExperimentConfig, study: optuna.Study, parent: Tracker, target: Path,
             say: Callable[[str], None], progress: Callable[[int, RoundMetrics], None] | None) -> None:
    trial = study.ask()
    single = len(config.study.objectives) == 1
    try:
        overrides = suggest(trial, config.study.space)
        cfg = trial_config(config, overrides, trial.number)
        validate(cfg)
    except SflamError as exc:
        say(f"trial {trial.number}: FAIL ({exc})")
        trial.set_user_attr("error", str(exc))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    say(f"trial {trial.number}: {', '.join(f'{k}={v}' for k, v in overrides.items())}")
    objective = config.study.objectives[0]

    def on_round(metrics: RoundMetrics) -> None:
        if progress is not None:
            progress(trial.number, metrics)
        value = getattr(metrics, ROUND_VALUE.get(objective, objective), None)
        if single and value is not None:
            trial.report(float(value), metrics.round)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at round {metrics.round}")

    try:
        result = train(cfg, run_name=f"trial-{trial.number}", parent_run_id=parent.run_id, progress=on_round,
                       out_dir=target / f"trial{trial.number}", experiment_name=config.tracking.experiment or
                       config.name, tags=_tags(study.study_name, trial.number))
        values = _values(config, result)
    except optuna.TrialPruned:
        say(f"trial {trial.number}: PRUNED")
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    except Exception as exc:  # a failing trial is recorded as FAIL and the study goes on
        say(f"trial {trial.number}: FAIL ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    trial.set_user_attr("mlflow_run_id", result.mlflow_run_id)
    study.tell(trial, values if not single else values[0])
    say(f"trial {trial.number}: " + ", ".join(f"{o}={v:.4g}" for o, v in zip(config.study.objectives, values,
                                                                               strict=True)))


def _remote_trial(config_dict: dict[str, Any]) -> RunResult:
    from sflam.platform.config import config_from_dict

    return run_experiment(config_from_dict(config_dict))


def _run_parallel(config: ExperimentConfig, study: optuna.Study, parent: Tracker, target: Path,
                  say: Callable[[str], None]) -> None:
    """Ask-and-tell with `study.parallel` trials in flight as Ray tasks; the driver records and tells."""
    import ray

    owns = not ray.is_initialized()
    if owns:
        start_ray(config.ray.address, num_cpus=config.ray.local_cpus or None)
    task = ray.remote(num_cpus=1)(_remote_trial)
    running: dict[Any, tuple[optuna.trial.Trial, ExperimentConfig]] = {}
    asked = 0
    try:
        while asked < config.study.trials or running:
            while asked < config.study.trials and len(running) < config.study.parallel:
                trial = study.ask()
                asked += 1
                try:
                    cfg = trial_config(config, suggest(trial, config.study.space), trial.number)
                    validate(cfg)
                except SflamError as exc:
                    say(f"trial {trial.number}: FAIL ({exc})")
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    continue
                say(f"trial {trial.number}: started on Ray")
                running[task.remote(cfg.to_dict())] = (trial, cfg)
            if not running:
                continue
            ready, _ = ray.wait(list(running), num_returns=1)
            trial, cfg = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
                record(result, cfg, run_name=f"trial-{trial.number}", parent_run_id=parent.run_id,
                       out_dir=target / f"trial{trial.number}", experiment_name=config.tracking.experiment or
                       config.name, tags=_tags(study.study_name, trial.number))
                values = _values(config, result)
            except Exception as exc:
                say(f"trial {trial.number}: FAIL ({type(exc).__name__})")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            trial.set_user_attr("mlflow_run_id", result.mlflow_run_id)
            study.tell(trial, values if len(values) > 1 else values[0])
            say(f"trial {trial.number}: done")
    finally:
        if owns:
            ray.shutdown()


def pareto_rows(study: optuna.Study, config: ExperimentConfig) -> list[dict[str, Any]]:
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        return []
    best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    rows = []
    for t in sorted(best, key=lambda t: t.number):
        row: dict[str, Any] = {"trial": t.number}
        row.update(dict(zip(config.study.objectives, t.values, strict=True)))
        row.update(t.params)
        row["mlflow_run_id"] = t.user_attrs.get("mlflow_run_id")
        rows.append(row)
    return rows


def write_front(rows: list[dict[str, Any]], path: Path) -> Path:
    keys = list(dict.fromkeys(k for row in rows for k in row)) or ["trial"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row.get(k):.4g}" if isinstance(row.get(k), float) else str(row.get(k))
                                       for k in keys) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return path


def _save(ax: Any, path: Path, size: tuple[float, float], plt: Any) -> Path:
    figure: Any = ax.figure
    figure.set_size_inches(*size)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_study(study: optuna.Study, config: ExperimentConfig, target: Path) -> list[Path]:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    objectives = config.study.objectives
    out = []
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(objectives) > 1 and completed:
        pick = [0, objectives.index("energy_j")] if "energy_j" in objectives[1:] else [0, 1]
        try:
            ax = ovm.plot_pareto_front(study, targets=lambda t: tuple(t.values[i] for i in pick),
                                       target_names=[objectives[i] for i in pick])
            names = [objectives[i] for i in pick]
            ax.set_title(f"{study.study_name}: Pareto front ({names[0]} vs {names[1]}; front in red)")
            ax.set_xlabel("test accuracy" if names[0] == "accuracy" else names[0])
            ax.set_ylabel("device energy per round (J)" if names[1] == "energy_j" else names[1])
            out.append(_save(ax, target / "pareto_front.png", (7.5, 5.5), plt))
        except Exception as exc:  # a plot is never worth a failed study
            print(f"sflam: warning: no Pareto-front plot ({exc})", file=sys.stderr)
    if len(completed) >= 2:
        try:
            sign = -1.0 if OBJECTIVES[objectives[0]] == "maximize" else 1.0  # importance of getting it better
            ax = ovm.plot_param_importances(study, target=lambda t: sign * t.values[0],
                                            target_name=f"{objectives[0]} ({OBJECTIVES[objectives[0]]})")
            out.append(_save(ax, target / "param_importances.png", (7.5, 4.5), plt))
        except Exception as exc:
            print(f"sflam: warning: no parameter-importance plot ({exc})", file=sys.stderr)
    return out
