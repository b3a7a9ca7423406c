"""Study storages: PostgreSQL URLs, what never reaches a log, which store a study gets, lost trials retried."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sflam.platform.config import load_config
from sflam.platform.errors import SflamError
from sflam.platform.tracking import redact
from sflam.search.storage import engine_kwargs, open_storage, with_psycopg
from sflam.search.study import open_study, run_study, study_storage

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "study-smoke.yaml"


def test_postgres_urls_use_psycopg_3() -> None:
    assert with_psycopg("postgresql://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    assert with_psycopg("postgres://u@h/db?passfile=/p") == "postgresql+psycopg://u@h/db?passfile=/p"
    assert with_psycopg("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"  # a driver the user chose
    assert with_psycopg("sqlite:///x.db") == "sqlite:///x.db"


def test_a_password_in_a_url_never_reaches_a_log_or_mlflow() -> None:
    assert redact("postgresql://sflam:s3cr%t@127.0.0.1:5432/optuna") == "postgresql://sflam:***@127.0.0.1:5432/optuna"
    assert redact("http://admin:pw@host:5000") == "http://admin:***@host:5000"
    assert redact("postgresql+psycopg://sflam@127.0.0.1/optuna?passfile=/r/pgpass") == \
        "postgresql+psycopg://sflam@127.0.0.1/optuna?passfile=/r/pgpass"
    assert redact("sqlite:////abs/optuna.db") == "sqlite:////abs/optuna.db"


def test_engine_settings_survive_long_studies() -> None:
    pg = engine_kwargs("postgresql+psycopg://u@h/db", pool_size=10)
    assert pg["pool_pre_ping"] is True and pg["pool_size"] == 10 and pg["pool_recycle"] == 1800
    assert pg["connect_args"]["keepalives"] == 1 and "password" not in pg["connect_args"]
    assert engine_kwargs("postgresql+psycopg://u@h/db", 2, password="pw")["connect_args"]["password"] == "pw"
    assert engine_kwargs("sqlite:///x.db", 10) == {"pool_pre_ping": True, "connect_args": {"timeout": 30}}


def test_which_store_a_study_gets(tmp_path: Path) -> None:
    local = f"sqlite:///{tmp_path.resolve()}/optuna.db"
    parallel = load_config(SMOKE, [f"output_dir={tmp_path}", "study.parallel=8"])
    assert study_storage(parallel, nodes=1) == local  # one node: the SQLite file under the results
    assert study_storage(load_config(SMOKE, [f"output_dir={tmp_path}"]), nodes=4) == local  # one trial at a time
    with pytest.raises(SflamError, match=r"needs a database server every node reaches: start one with `sflam db start"):
        study_storage(parallel, nodes=4)
    given = load_config(SMOKE, [f"output_dir={tmp_path}", "study.parallel=8", f"study.storage={local}"])
    with pytest.raises(SflamError, match=r"a SQLite file cannot serve study.parallel=8 on 4 nodes"):
        study_storage(given, nodes=4)
    assert study_storage(given, nodes=4, sqlite_on_cluster=True) == local
    pg = load_config(SMOKE, ["study.parallel=8", "study.storage=postgresql://sflam@10.0.0.5:5432/optuna"])
    assert study_storage(pg, nodes=4) == "postgresql+psycopg://sflam@10.0.0.5:5432/optuna"


@pytest.mark.parametrize(("override", "allowed"), [
    ("study.heartbeat_interval=0", "an integer >= 1"),
    ("study.grace_period=10", "an integer > study.heartbeat_interval=10"),
    ("study.retries=-1", "an integer >= 0"),
])
def test_heartbeat_settings_are_checked_with_one_line(override: str, allowed: str) -> None:
    with pytest.raises(SflamError) as info:
        load_config(SMOKE, [override])
    assert str(info.value).endswith(allowed) and "\n" not in str(info.value)


@pytest.mark.integration
def test_a_trial_its_process_left_running_fails_by_heartbeat_and_runs_again_on_resume(tmp_path: Path) -> None:
    config = load_config(SMOKE, [f"output_dir={tmp_path}", "study.trials=1", "study.sampler=random",
                                 "study.heartbeat_interval=1", "study.grace_period=2", "train.rounds=1",
                                 "train.eval_every=1", "data.synthetic_samples=200", "quant.weights=fp32",
                                 "study.space={allocation.lam: {type: float, low: 0.1, high: 0.9}}"])
    # a driver that asked a trial, beat once and died before telling
    study, _, url = open_study(config, resume=False)
    dead = study.ask()
    lam = dead.suggest_float("allocation.lam", 0.1, 0.9)
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(3.5)  # longer than the grace period
    said: list[str] = []
    result = run_study(config, resume=True, announce=said.append)
    trials = optuna.load_study(study_name="study-smoke", storage=open_storage(url)).trials
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.FAIL), (1, TrialState.COMPLETE),
                                                     (2, TrialState.COMPLETE)]
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.params == {"allocation.lam": lam}  # the same point, run again
    fresh = [t for t in trials if t.number != 0 and "failed_trial" not in t.system_attrs]
    assert len(fresh) == 1 and result.trials == 3  # the retry comes on top of the trials asked for
    assert any(line.startswith(f"trial {retry.number} (retry of trial 0): ") for line in said)


def test_processes_opening_a_new_sqlite_study_file_at_once_all_get_it(tmp_path: Path) -> None:
    # each creates Optuna's tables in the empty file: SQLite lets one win ("table ... already exists"), the others retry
    import threading

    errors: list[str] = []

    def open_it() -> None:
        try:
            open_storage(f"sqlite:///{tmp_path}/optuna.db").engine.dispose()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
