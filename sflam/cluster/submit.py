"""`sflam submit`: run any sflam command as a Ray job (the Ray jobs SDK), print its id, follow its logs.

The job carries the working directory (minus the virtual environment, results and stores), a runtime
environment (threads, offline Hugging Face; optionally the project's requirements) and the entrypoint's
resources. The job logs to an MLflow tracking server (--tracking-uri, MLFLOW_TRACKING_URI, or for a head
on this machine the `sflam server` over ./results, started when none runs), so its runs and artifacts
outlive Ray's temporary folders; a server with basic-auth gets the user of MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD (or the admin of the `sflam server --auth` over ./results) in the job's
environment, where MLflow's client reads them. The exit status is the job's: 0 when it SUCCEEDED, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sflam.platform.errors import SflamError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".venv", ".git", "results", "mlruns", "mlartifacts", "*.db", "*.log", "__pycache__", ".ruff_cache",
            ".mypy_cache", ".pytest_cache"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def project_requirements(root: Path) -> list[str]:
    """requirements.lock's pinned versions (what `make install` installs) in the Makefile's order: the pinned
    torch, DeepSpeed, then the rest.

    Ray itself is left out: the job runs on the cluster's Ray, which a pip environment must not replace.
    """
    lines = (root / "requirements.lock").read_text().splitlines()
    deps = [line.strip() for line in lines if line and not line.startswith((" ", "#")) and _name(line) != "ray"]
    first = [d for name in ("torch", "deepspeed") for d in deps if _name(d) == name]
    return first + [d for d in deps if d not in first]


# DeepSpeed is a source distribution: without build isolation its build sees the pinned torch instead of
# fetching an unpinned one (docs/concepts/models-and-data.md); Ray's defaults are kept.
PIP_OPTIONS = ["--no-build-isolation", "--disable-pip-version-check", "--no-cache-dir"]


def runtime_env(working_dir: Path, pip: bool, tracking_uri: str | None = None,
                credentials: dict[str, str] | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": EXCLUDES,
        "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"},
    }
    if tracking_uri:
        env["env_vars"]["MLFLOW_TRACKING_URI"] = tracking_uri
        env["env_vars"].update(credentials or {})
    if pip:
        env["pip"] = {"packages": project_requirements(working_dir), "pip_install_options": PIP_OPTIONS}
    return env


def job_entrypoint(command: list[str]) -> str:
    """The job's shell command for a sflam command (the KubeRay RayJob's entrypoint is the same)."""
    return "python -m sflam " + shlex.join(command)


def is_local(address: str) -> bool:
    host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def job_tracking_uri(explicit: str | None, address: str, working_dir: Path, command: list[str]) -> str | None:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else for a head on this machine the `sflam server` over results/
    (unless the command sets tracking.uri itself)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri or not is_local(address) or any(word.startswith("tracking.uri=") for word in command):
        return uri
    from sflam.cluster import tracking_server

    server, new = tracking_server.start(working_dir / "results")
    print(f"sflam submit: {'started' if new else 'using'} the MLflow tracking server {server.uri} (pid {server.pid}, "
          f"store {server.backend_store_uri}); stop it with `sflam server stop`", file=sys.stderr, flush=True)
    return server.uri


def job_credentials(tracking_uri: str | None, working_dir: Path) -> dict[str, str]:
    """The tracking server's user for the job: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from this
    environment, else the admin of the basic-auth `sflam server` over ./results when the job logs there."""
    from sflam.cluster import tracking_server

    names = (tracking_server.USERNAME_ENV, tracking_server.PASSWORD_ENV)
    given = {name: os.environ[name] for name in names if os.environ.get(name)}
    if given or not tracking_uri:
        return given
    server = tracking_server.running(working_dir / "results")
    if server is not None and server.auth and server.uri == tracking_uri.rstrip("/"):
        return tracking_server.credentials(working_dir / "results")
    return {}


def use_cluster_token() -> None:
    """Send the cluster's token the way `ray start` finds it: RAY_AUTH_MODE unset and a token in
    RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token turn token authentication on."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # an older Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def submit(command: list[str], address: str | None = None, working_dir: Path | None = None, pip: bool = False,
           num_cpus: float | None = None, num_gpus: float | None = None, follow: bool = True,
           tracking_uri: str | None = None) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    if not command:
        raise SflamError("sflam submit needs a command after --, e.g. sflam submit -- run -c configs/smoke.yaml")
    if command[0] in ("sflam", "python"):
        raise SflamError(f"give the sflam command without '{command[0]}': sflam submit -- run -c CONFIG ...")
    target = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if not target.startswith(("http://", "https://")):
        target = f"http://{target}"
    use_cluster_token()
    try:
        client = JobSubmissionClient(target)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200]
        if "authentication" in first.lower():
            raise SflamError(f"the Ray job server at {target} wants the cluster's token ({first}); put it in "
                             "RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
                             ) from None
        raise SflamError(f"no Ray job server at {target} ({first}); start one with "
                         "`ray start --head --dashboard-host 127.0.0.1` or pass --address") from None
    entrypoint = job_entrypoint(command)
    root = working_dir or Path.cwd()
    uri = job_tracking_uri(tracking_uri, target, root, command)
    env = runtime_env(root, pip, uri, job_credentials(uri, root))
    kwargs: dict[str, Any] = {}
    if num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = num_cpus
    if num_gpus is not None:
        kwargs["entrypoint_num_gpus"] = num_gpus
    deadline = time.time() + 120
    while True:  # a freshly started head answers before its job agent is up
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env,
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
