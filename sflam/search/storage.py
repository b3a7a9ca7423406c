"""Where a study lives: SQLite for one process, PostgreSQL for several processes or nodes (docs/how-to/stores.md).

A study's storage is any SQLAlchemy URL or a journal file. SQL storages are Optuna's `RDBStorage` with
its heartbeat: the process that runs a trial (this one, or a Ray task on any node) records the trial's
heartbeat every `study.heartbeat_interval` seconds, a trial whose heartbeat is older than
`study.grace_period` is marked FAIL (`optuna.storages.fail_stale_trials`), and Optuna's
`RetryHeartbeatStaleTrialCallback` queues it again `study.retries` times.

Connection settings for long studies, from Optuna's issue tracker:
- idle connections dropped by the server or the network between trials ("server closed the connection
  unexpectedly", optuna#5600): `pool_pre_ping` tests a connection before use, `pool_recycle` renews old
  ones, TCP keepalives notice a dead peer;
- "too many clients" (optuna#1347, #1115): every process holds its own pool, so the pools are sized to
  what each process does at once (the driver: its thread and one heartbeat per trial it records; a
  trial's task: its thread and its heartbeat), engines are disposed when a trial ends, and a study
  whose parallelism needs more connections than the server allows stops with one line before it starts.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy

from sflam.cluster.database import is_postgres, with_psycopg
from sflam.platform.config import ExperimentConfig
from sflam.platform.errors import SflamError
from sflam.platform.tracking import redact

__all__ = ["open_storage", "redact", "storage_url", "with_psycopg"]

# connections one trial's task holds (its thread, its heartbeat thread) and the driver's own (its thread,
# a heartbeat per trial it records, one spare)
TASK_CONNECTIONS = 2
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def is_journal(url: str) -> bool:
    return url.endswith((".log", ".jsonl")) and "://" not in url


def is_sqlite(url: str) -> bool:
    return url.lower().startswith("sqlite")


def storage_url(config: ExperimentConfig) -> str:
    """study.storage (PostgreSQL on psycopg 3), else the SQLite file under the results folder."""
    if config.study.storage:
        return with_psycopg(config.study.storage)
    root = Path(config.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'optuna.db'}"


def engine_kwargs(url: str, pool_size: int, password: str | None = None) -> dict[str, Any]:
    """SQLAlchemy engine settings that survive long studies (see the module's notes)."""
    if is_postgres(url):
        connect: dict[str, Any] = {**KEEPALIVES, "connect_timeout": 10}
        if password is not None:  # a node without the password file gets the password from the driver
            connect["password"] = password
        return {"pool_pre_ping": True, "pool_recycle": 1800, "pool_size": pool_size, "max_overflow": 2,
                "pool_timeout": 60, "connect_args": connect}
    if is_sqlite(url):  # one writer at a time: wait for the lock rather than fail at once
        return {"pool_pre_ping": True, "connect_args": {"timeout": 30}}
    return {"pool_pre_ping": True}


def _retry_callback(retries: int) -> Any:
    try:
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
    except ImportError:  # Optuna before 4.9 names it RetryFailedTrialCallback
        from optuna.storages import RetryFailedTrialCallback as Retry  # type: ignore[no-redef,attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return Retry(max_retry=retries)


def open_storage(url: str, config: ExperimentConfig | None = None) -> Any:
    """The Optuna storage of a URL: a journal file, or an RDBStorage with heartbeat and retry of lost trials."""
    if is_journal(url):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    url = with_psycopg(url)
    study = config.study if config is not None else None
    kwargs: dict[str, Any] = {}
    if study is not None:
        kwargs = {"heartbeat_interval": study.heartbeat_interval, "grace_period": study.grace_period,
                  "heartbeat_stale_trial_callback": _retry_callback(study.retries)}
    pool = (study.parallel if study is not None else 1) + 2
    for attempt in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url, pool), **kwargs)
            except ImportError as exc:
                raise SflamError(f"study.storage={redact(url)}: its database driver is missing ({exc})") from None
            except Exception as exc:  # a server that is not there, a wrong password: one line naming the URL
                # two processes creating Optuna's tables in a new database at once: one of them loses the race
                # (PostgreSQL: a unique violation in its catalogue; SQLite: "table ... already exists")
                if _lost_creation_race(exc) and attempt < 2:
                    time.sleep(1.0)
                    continue
                first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
                raise SflamError(f"study.storage={redact(url)}: cannot open it ({first[0][:200] if first else exc}); "
                                 "for the project's own PostgreSQL run `sflam db start`") from None
    raise AssertionError("unreachable")


def _lost_creation_race(exc: Exception) -> bool:
    if isinstance(exc, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)):
        return True
    return isinstance(exc, sqlalchemy.exc.OperationalError) and "already exists" in str(exc)


def trial_storage(url: str, heartbeat_interval: int, password: str | None) -> Any:
    """The storage a trial's Ray task opens to record its heartbeat: a pool of its own two connections."""
    kwargs = engine_kwargs(url, pool_size=TASK_CONNECTIONS, password=password)
    if "max_overflow" in kwargs:
        kwargs["max_overflow"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_compatibility_check=True,
                                          skip_table_creation=True, heartbeat_interval=heartbeat_interval)


def connections_needed(parallel: int) -> int:
    """Connections a study holds at most: the driver's pool and each running trial's task."""
    return parallel + 2 + 2 + parallel * TASK_CONNECTIONS


def check_connections(storage: Any, parallel: int) -> None:
    """One line before any trial when the PostgreSQL server cannot take the study's connections."""
    import sqlalchemy

    engine = getattr(storage, "engine", None)
    if engine is None or engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        limit = int(conn.execute(sqlalchemy.text("SHOW max_connections")).scalar_one())
        reserved = int(conn.execute(sqlalchemy.text("SHOW superuser_reserved_connections")).scalar_one())
        in_use = int(conn.execute(sqlalchemy.text("SELECT count(*) FROM pg_stat_activity "
                                                  "WHERE backend_type = 'client backend'")).scalar_one())
    free = limit - reserved - in_use + 1  # this check's own connection is returned to the pool
    need = connections_needed(parallel)
    if need > free:
        raise SflamError(f"study.parallel={parallel} needs up to {need} PostgreSQL connections, the server has "
                         f"{free} free (max_connections={limit}, {in_use} in use); lower study.parallel or raise "
                         "max_connections")
