"""Checks before any work: a Ray job must not keep its results only in its temporary folder; a cluster must answer.

Inside a Ray job submitted with a working directory, the driver's working directory is Ray's unpacked
copy of it (`.../runtime_resources/working_dir_files/_ray_pkg_<hash>`), which disappears with the Ray
session and lives on whichever node ran the driver. The default `output_dir` and MLflow store are
relative to it, so a run there would be lost; this module refuses such a run in one line, naming the two
settings that fix it. A run that logs to a tracking server keeps every artifact there, so its local
outputs may stay job-local (they are a convenience copy).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sflam.cluster.connect import configured_address, probe, resolve
from sflam.platform.config import ExperimentConfig
from sflam.platform.errors import SflamError

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's driver


@dataclass(frozen=True)
class RayJob:
    """The Ray job this process is the driver of: its submission id and temporary working directory."""

    job_id: str
    working_dir: Path | None


def current_job() -> RayJob | None:
    """The job context Ray gives a job's driver (its metadata and runtime environment), or None outside one."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        job_config = json.loads(raw)
    except ValueError:
        return None
    job_id = str((job_config.get("metadata") or {}).get("job_submission_id") or "")
    if not job_id:
        return None
    runtime_env = job_config.get("runtime_env") or {}
    # with a working_dir the driver runs in Ray's unpacked, temporary copy of it
    return RayJob(job_id, Path.cwd().resolve() if runtime_env.get("working_dir") else None)


def local_store_path(uri: str | None, output_dir: str) -> Path | None:
    """The folder of a local MLflow store (None for a server): sqlite, file or a bare path."""
    if uri is None:
        return Path(output_dir).resolve()  # the default store: sqlite:///<output_dir>/mlflow.db
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).resolve().parent
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:")).resolve()
    if "://" in uri or uri == "databricks":
        return None
    return Path(uri).resolve()


def _inside(path: Path | None, folder: Path) -> bool:
    return path is not None and path.is_relative_to(folder)


def refuse_job_local_results(config: ExperimentConfig, job: RayJob | None = None) -> None:
    """One line and no work when a Ray job's results would live only in its temporary working directory."""
    job = job or current_job()
    if job is None or job.working_dir is None:
        return
    uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    outputs_lost = _inside(Path(config.output_dir).resolve(), job.working_dir)
    store = local_store_path(uri, config.output_dir) if config.tracking.enabled else None
    store_lost = config.tracking.enabled and _inside(store, job.working_dir)
    # a run tracked elsewhere keeps its artifacts there; untracked, its outputs are all there is
    if store_lost or (outputs_lost and not config.tracking.enabled):
        where = f"MLflow store {uri or 'sqlite:///' + config.output_dir + '/mlflow.db'}" if store_lost else ""
        where += (" and " if where and outputs_lost else "") + (f"outputs {config.output_dir}" if outputs_lost else "")
        raise SflamError(f"Ray job {job.job_id} would keep its {where} only in the job's temporary working directory "
                         f"{job.working_dir}; set tracking.uri (or MLFLOW_TRACKING_URI) to a tracking server, e.g. "
                         "the one `sflam server start` prints, or output_dir to an absolute path that outlives the "
                         "job")


def uses_ray(config: ExperimentConfig) -> bool:
    return config.runtime == "ray" or config.study.parallel > 1


def check_before_work(config: ExperimentConfig) -> None:
    """Every check that must fail in seconds, before a model loads: job-local results, an unreachable cluster."""
    refuse_job_local_results(config)
    address = configured_address(config.ray.address)
    if uses_ray(config) and address is not None and address != "local":
        probe(resolve(address))
