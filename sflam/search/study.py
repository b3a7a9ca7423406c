"""`sflam study`: design-space exploration with Optuna, every trial a child MLflow run (docs/how-to/studies.md,
docs/how-to/stores.md).

Multi-objective by default (NSGA-II over accuracy up; round latency, device energy and device memory
down), single-objective by choice (then each round's value is reported and the median pruner stops
poor trials). Trials are asked and told: in this process one after another, or `study.parallel` at a
time as Ray tasks whose results the driver records in MLflow (only the driver talks to MLflow). The
storage is any SQLAlchemy URL or a journal file (sflam.search.storage); a study resumes with --resume.
At the end the Pareto front is written as a table, and Optuna's plots of the front and of parameter
importances as PNG files.

Lost trials: in an SQL storage the process running a trial records its heartbeat (the driver for its
own trials, the Ray task for a parallel one; the driver again while it records a finished one). A
trial whose worker or node died stops beating, Optuna marks it FAIL once `study.grace_period` has
passed and queues it again (`study.retries` times); the driver runs the queued copy like a new trial,
so no trial stays RUNNING. A trial's own error is its FAIL, never retried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from sflam.cluster import database
from sflam.pipelines.train import train
from sflam.platform.build import validate
from sflam.platform.config import OBJECTIVES, ExperimentConfig
from sflam.platform.errors import ConfigError, SflamError
from sflam.platform.results import RoundMetrics
from sflam.platform.tracking import Tracker, redact
from sflam.search.front import pareto_rows, plot_study, write_front
from sflam.search.parallel import run_parallel, study_cluster
from sflam.search.space import check_space, suggest, trial_config
from sflam.search.storage import (
    check_connections,
    is_sqlite,
    open_storage,
    storage_url,
    with_psycopg,
)
from sflam.search.trials import ROUND_VALUE, ask, beating, fail_stale, queued, tell, trial_tags, trial_values


@dataclass
class StudyResult:
    study_name: str
    storage: str
    trials: int
    front: list[dict[str, Any]]
    parent_run_id: str | None
    table_path: Path
    plots: list[Path]


def study_storage(config: ExperimentConfig, nodes: int = 1, sqlite_on_cluster: bool = False) -> str:
    """The study's storage URL; on a cluster of several nodes a database server every node reaches.

    Parallel trials on several nodes record their heartbeats from their own node: the default is then
    the `sflam db` server of output_dir, and a SQLite file is refused (`sqlite_on_cluster` lets the
    stores benchmark run one where every node shares this machine's disk)."""
    parallel, multi = config.study.parallel, config.study.parallel > 1 and nodes > 1
    if config.study.storage:
        url = with_psycopg(config.study.storage)
    elif multi:
        server = database.running(Path(config.output_dir))
        if server is None:
            raise SflamError(f"study.parallel={parallel} on a cluster of {nodes} nodes needs a database server every "
                             f"node reaches: start one with `sflam db start --dir {config.output_dir}` (then it is "
                             "the default), or set study.storage=postgresql://...")
        url = server.url("optuna")
    else:
        url = storage_url(config)
    if multi and is_sqlite(url) and not sqlite_on_cluster:
        raise SflamError(f"study.storage={redact(url)}: a SQLite file cannot serve study.parallel={parallel} on "
                         f"{nodes} nodes (their trials record heartbeats from every node); start PostgreSQL with "
                         f"`sflam db start --dir {config.output_dir}` and leave study.storage unset")
    return url


def _sampler(config: ExperimentConfig) -> optuna.samplers.BaseSampler:
    study = config.study
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=study.seed)
    if study.sampler == "tpe" or len(study.objectives) == 1:
        return optuna.samplers.TPESampler(seed=study.seed, multivariate=True)
    return optuna.samplers.NSGAIISampler(seed=study.seed, population_size=max(4, min(20, study.trials)))


def open_study(config: ExperimentConfig, resume: bool, url: str | None = None) -> tuple[optuna.Study, str, str]:
    name = config.study.name or config.name
    url = url or storage_url(config)
    storage = open_storage(url, config)
    check_connections(storage, config.study.parallel)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if name in existing and not resume:
        raise ConfigError("study.name", name, f"a new study name, or --resume to add trials (it exists in "
                                              f"{redact(url)})")
    directions: list[Any] = [OBJECTIVES[o] for o in config.study.objectives]
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
              if len(directions) == 1 and config.study.prune else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=name, storage=storage, directions=directions, sampler=_sampler(config),
                                pruner=pruner, load_if_exists=resume)
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError("study.objectives", config.study.objectives,
                          f"the objectives study {name} was created with ({len(study.directions)} directions)")
    return study, name, url


def run_study(config: ExperimentConfig, resume: bool = False, announce: Callable[[str], None] | None = None,
              progress: Callable[[int, RoundMetrics], None] | None = None,
              sqlite_on_cluster: bool = False) -> StudyResult:
    say = announce or (lambda text: None)
    if not config.study.space:
        raise ConfigError("study.space", {}, "a mapping of dotted config keys to {type, low/high or choices}")
    check_space(config)
    with study_cluster(config) as nodes:
        return _study(config, resume, say, progress, study_storage(config, nodes, sqlite_on_cluster))


def _study(config: ExperimentConfig, resume: bool, say: Callable[[str], None],
           progress: Callable[[int, RoundMetrics], None] | None, url: str) -> StudyResult:
    study, name, url = open_study(config, resume, url)
    target = Path(config.output_dir) / f"{name}-study"
    target.mkdir(parents=True, exist_ok=True)
    parent = Tracker(config, run_name=f"{name}-study", tags={"sflam.pipeline": "study", "optuna.study": name,
                                                            "optuna.storage": redact(url)})
    before = len(study.trials)
    say(f"study {name} in {redact(url)}: {before} earlier trial(s), adding {config.study.trials}, objectives "
        f"{', '.join(config.study.objectives)}")
    try:
        if config.study.parallel > 1:
            run_parallel(config, study, parent, target, say, url)
        else:
            fresh = 0
            # before each trial, as Study.optimize does: trials whose process died (an earlier driver's, another
            # driver's) become FAIL and their copies are queued
            while True:
                fail_stale(study)
                if fresh >= config.study.trials and not queued(study):
                    break
                fresh += _run_one(config, study, parent, target, say, progress)
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
    return StudyResult(name, redact(url), len(study.trials), front, parent.run_id, table_path, plots)


def _run_one(config: ExperimentConfig, study: optuna.Study, parent: Tracker, target: Path,
             say: Callable[[str], None], progress: Callable[[int, RoundMetrics], None] | None) -> int:
    """One trial in this process; returns 1 for a new trial, 0 for the retry of a lost one."""
    trial, retry_of = ask(study)
    single = len(config.study.objectives) == 1
    try:
        overrides = suggest(trial, config.study.space)
        cfg = trial_config(config, overrides, trial.number)
        validate(cfg)
    except SflamError as exc:
        say(f"trial {trial.number}: FAIL ({exc})")
        trial.set_user_attr("error", str(exc))
        study.tell(trial, state=TrialState.FAIL)
        return int(retry_of is None)
    again = f" (retry of trial {retry_of})" if retry_of is not None else ""
    say(f"trial {trial.number}{again}: {', '.join(f'{k}={v}' for k, v in overrides.items())}")
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
        with beating(study, trial):
            result = train(cfg, run_name=f"trial-{trial.number}", parent_run_id=parent.run_id,
                           progress=on_round, out_dir=target / f"trial{trial.number}",
                           experiment_name=config.tracking.experiment or config.name,
                           tags=trial_tags(study.study_name, trial, retry_of))
            values = trial_values(config, result)
            trial.set_user_attr("mlflow_run_id", result.mlflow_run_id)
    except optuna.TrialPruned:
        say(f"trial {trial.number}: PRUNED")
        tell(study, trial, say, state=TrialState.PRUNED)
        return int(retry_of is None)
    except Exception as exc:  # a failing trial is recorded as FAIL and the study goes on
        say(f"trial {trial.number}: FAIL ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
        tell(study, trial, say, state=TrialState.FAIL)
        return int(retry_of is None)
    if tell(study, trial, say, values if not single else values[0]):
        say(f"trial {trial.number}: " + ", ".join(f"{o}={v:.4g}" for o, v in zip(config.study.objectives, values,
                                                                                   strict=True)))
    return int(retry_of is None)
