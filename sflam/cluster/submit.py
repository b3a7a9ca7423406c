"""`sflam submit`: run any sflam command as a Ray job (the Ray jobs SDK), print its id, follow its logs.

The job carries the working directory (minus the virtual environment, results and stores), a runtime
environment (threads, offline Hugging Face; optionally the project's requirements) and the entrypoint's
resources. The exit status is the job's: 0 when it SUCCEEDED, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from sflam.platform.errors import SflamError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".venv", ".git", "results", "mlruns", "mlartifacts", "*.db", "*.log", "__pycache__", ".ruff_cache",
            ".mypy_cache", ".pytest_cache"]


def project_requirements(root: Path) -> list[str]:
    """The dependencies of pyproject.toml (torch stays whatever the cluster image has)."""
    data = tomllib.loads((root / "pyproject.toml").read_text())
    return [d for d in data["project"]["dependencies"] if not d.startswith("torch")]


def runtime_env(working_dir: Path, pip: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": EXCLUDES,
        "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"},
    }
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env["env_vars"]["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    if pip:
        env["pip"] = project_requirements(working_dir)
    return env


def submit(command: list[str], address: str | None = None, working_dir: Path | None = None, pip: bool = False,
           num_cpus: float | None = None, num_gpus: float | None = None, follow: bool = True) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    if not command:
        raise SflamError("sflam submit needs a command after --, e.g. sflam submit -- run -c configs/smoke.yaml")
    if command[0] in ("sflam", "python"):
        raise SflamError(f"give the sflam command without '{command[0]}': sflam submit -- run -c CONFIG ...")
    target = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if not target.startswith(("http://", "https://")):
        target = f"http://{target}"
    try:
        client = JobSubmissionClient(target)
    except Exception as exc:
        raise SflamError(f"no Ray job server at {target} ({str(exc).splitlines()[0][:200]}); start one with "
                         "`ray start --head --dashboard-host 127.0.0.1` or pass --address") from None
    entrypoint = "python -m sflam " + shlex.join(command)
    kwargs: dict[str, Any] = {}
    if num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = num_cpus
    if num_gpus is not None:
        kwargs["entrypoint_num_gpus"] = num_gpus
    deadline = time.time() + 120
    while True:  # a freshly started head answers before its job agent is up
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(working_dir or Path.cwd(), pip),
                                       **kwargs)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise SflamError(f"the job server at {target} refused the job: {str(exc).splitlines()[0][:300]}"
                                 ) from None
            time.sleep(2)
    print(f"submitted job {job_id} to {target}: {entrypoint}", file=sys.stderr, flush=True)
    print(job_id, flush=True)
    if not follow:
        return 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as exc:  # the log stream ended early: fall back to polling the status
        print(f"sflam submit: log stream ended ({type(exc).__name__}); waiting for the job", file=sys.stderr)
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = client.get_job_status(job_id)
    while status not in terminal:
        time.sleep(1.0)
        status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", file=sys.stderr, flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
