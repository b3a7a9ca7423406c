"""A trial's life in the study's storage: asked (a queued retry first), its heartbeat while this process works
on it, told (unless its heartbeat lapsed meanwhile), its objective values and MLflow tags."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import TrialState

from sflam.platform.config import ExperimentConfig
from sflam.platform.errors import SflamError
from sflam.platform.results import RunResult

ROUND_VALUE = {"accuracy": "eval_accuracy", "loss": "eval_loss"}
NODE_ATTR = "sflam.node"  # the Ray node a parallel trial runs on, set by its task when it starts
RETRY_OF = "failed_trial"  # Optuna's retry callback's system attribute: the trial a queued copy repeats


def trial_values(config: ExperimentConfig, result: RunResult) -> list[float]:
    summary = result.summary()
    values = []
    for objective in config.study.objectives:
        value = summary.get(objective)
        if value is None:
            raise SflamError(f"trial produced no {objective}")
        values.append(float(value))
    return values


def fail_stale(study: optuna.Study) -> None:
    """Optuna's check for trials whose heartbeat lapsed: FAIL, and their retry queued (by its callback)."""
    if is_heartbeat_enabled(study._storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)


def queued(study: optuna.Study) -> int:
    """Trials queued to run: copies of lost trials (Optuna's retry callback), or enqueued by hand."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def ask(study: optuna.Study) -> tuple[optuna.trial.Trial, int | None]:
    """The next trial (a queued one first) and, for a retry, the number of the trial it repeats."""
    with warnings.catch_warnings():  # the heartbeat is recorded by whoever runs the trial, not by optimize()
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        trial = study.ask()
    return trial, study._storage.get_trial_system_attrs(trial._trial_id).get(RETRY_OF)


@contextmanager
def beating(study: optuna.Study, trial: optuna.trial.Trial) -> Iterator[None]:
    """Optuna's heartbeat thread for a trial this process works on (a no-op without heartbeat)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        beat = get_heartbeat_thread(trial._trial_id, study._storage)
    beat.start()
    try:
        yield
    finally:
        beat.join()


def trial_tags(name: str, trial: optuna.trial.Trial, retry_of: int | None) -> dict[str, str]:
    tags = {"optuna.study": name, "optuna.trial_number": str(trial.number)}
    if retry_of is not None:
        tags["optuna.retry_of"] = str(retry_of)
    return tags


def tell(study: optuna.Study, trial: optuna.trial.Trial, say: Callable[[str], None], *args: Any,
          **kwargs: Any) -> bool:
    """Tell Optuna a trial's end; False when it was marked FAIL meanwhile (its heartbeat lapsed)."""
    try:
        study.tell(trial, *args, **kwargs)
        return True
    except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError) as exc:
        say(f"trial {trial.number}: its result came after it was marked FAIL for a lapsed heartbeat ({exc}); "
            "raise study.grace_period if this machine is that busy")
        return False
