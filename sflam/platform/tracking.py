"""MLflow tracking from the driver only, through MlflowClient (docs/how-to/tracking.md).

One run per experiment (nested child runs for compare / scale / study members), params = the flat
config, per-round metrics with step = round written in batches (`log_batch`), artifacts = the resolved
config, plots, the per-device allocation CSV, adapters (safetensors) and the summary JSON. The default
store is `sqlite:///<output_dir>/mlflow.db` with artifacts beside it; `tracking.uri` or
MLFLOW_TRACKING_URI points anywhere else. A tracking outage never stops training: the first failure
warns once, metrics keep buffering, and `close` flushes what it can (the rest is saved as JSON).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sflam.platform.config import ExperimentConfig
from sflam.platform.files import write_text

PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment in the view its kind names (the GenAI view without this tag);
# the value is the UI's ExperimentKind.CUSTOM_MODEL_DEVELOPMENT, its model-training view
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
PID_TAG, HOST_TAG, STARTED_TAG = "sflam.pid", "sflam.host", "sflam.process_started"
FAILURE_TAG = "sflam.failure_reason"


def tracking_uri(config: ExperimentConfig) -> str:
    if config.tracking.uri:
        return config.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = Path(config.output_dir).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _param(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return redact(text)[:6000]


def redact(text: str) -> str:
    """A URL with any password in it replaced by *** (a storage or tracking URI in the config, a tag)."""
    return re.sub(r"(://[^/:@\s]*:)[^@/\s]*@", r"\1***@", text)


def run_label(name: str, seed: int) -> str:
    """A run's name in its experiment: the member (method, trial, size, or the experiment) and its seed."""
    return name if re.search(r"seed\s*[=-]?\s*\d", name) else f"{name} (seed {seed})"


class Tracker:
    """One MLflow run: buffered metrics, artifacts, resilient to the tracking server going away."""

    def __init__(self, config: ExperimentConfig, run_name: str | None = None, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, experiment: str | None = None,
                 resume_run_id: str | None = None) -> None:
        self.config = config
        self.enabled = config.tracking.enabled
        self.buffer: list[Any] = []
        self.failed = False
        self.run_id: str | None = None
        self.uri = tracking_uri(config) if self.enabled else ""
        if not self.enabled:
            return
        # a tracking server that went away must cost seconds, not minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        # a client bound to this URI; mlflow.set_tracking_uri would leak it into the process environment
        for attempt in range(5):  # two processes creating one sqlite store race on its schema: retry
            try:
                self.client = MlflowClient(self.uri)
                self.client.search_experiments(max_results=1)
                break
            except Exception as exc:
                if attempt == 4:
                    self._warn("opening the store", exc)
                    return
                time.sleep(1.0 + attempt)
        self._guard(clean_stale_runs, self.client)  # runs whose process is gone never stay RUNNING
        if resume_run_id is not None and self._guard(self._resume, resume_run_id):
            return
        self._guard(self._start, run_name or config.name, parent_run_id, tags or {},
                    experiment or config.tracking.experiment or config.name)

    # ------------------------------------------------------------------ plumbing
    def _warn(self, what: str, exc: Exception) -> None:
        if not self.failed:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            print(f"sflam: warning: MLflow tracking at {self.uri} failed while {what} ({first}); training goes on, "
                  "metrics are buffered and flushed at the end", file=sys.stderr, flush=True)
        self.failed = True

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # tracking must never kill a run
            self._warn(getattr(fn, "__name__", "tracking"), exc)
            return None

    def _start(self, run_name: str, parent: str | None, tags: dict[str, str], experiment: str) -> bool:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            try:
                experiment_id = self.client.create_experiment(experiment, artifact_location=location,
                                                              tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
            except Exception:  # another process created it a moment ago
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = found.experiment_id
            if EXPERIMENT_KIND_TAG not in found.tags:  # made before the platform set its kind
                self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        all_tags = {**{k: redact(v) for k, v in tags.items()}, "sflam.runtime": self.config.runtime,
                    "sflam.model": self.config.model.name, "sflam.seed": str(self.config.seed), **owner_tags()}
        if parent:
            all_tags[PARENT_TAG] = parent
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, _param(v)) for k, v in self.config.to_flat().items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        return True

    def _resume(self, run_id: str) -> bool:
        """Continue an interrupted run: the same MLflow run, RUNNING again under this process."""
        self.client.update_run(run_id, status="RUNNING")
        for key, value in owner_tags().items():
            self.client.set_tag(run_id, key, value)
        if FAILURE_TAG in self.client.get_run(run_id).data.tags:  # its earlier failure is no longer the story
            self.client.delete_tag(run_id, FAILURE_TAG)
        self.run_id = run_id
        return True

    def logged_steps(self, key: str) -> set[int]:
        """Steps (rounds) of a metric the store already holds: a resumed run logs only the others."""
        if not self.enabled or self.run_id is None:
            return set()
        history = self._guard(self.client.get_metric_history, self.run_id, key) or []
        return {int(m.step) for m in history}

    # ------------------------------------------------------------------ metrics
    def log_metrics(self, values: dict[str, float | None], step: int) -> None:
        """Buffer metrics of one step (a round); flushed every `tracking.flush_every` rounds."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in values.items():
            if value is not None and isinstance(value, (int, float)):
                self.buffer.append(Metric(key, float(value), now, step))
        if step % self.config.tracking.flush_every == 0 and not self.failed:  # after a failure: once, at the end
            self.flush()

    def flush(self) -> bool:
        if not self.enabled or not self.buffer or self.run_id is None:
            return not self.buffer
        pending, self.buffer = self.buffer, []
        try:
            for start in range(0, len(pending), 1000):
                self.client.log_batch(self.run_id, metrics=pending[start:start + 1000])
            return True
        except Exception as exc:
            self._warn("logging metrics", exc)
            self.buffer = pending + self.buffer
            return False

    def log_params(self, params: dict[str, str]) -> None:
        """Parameters known only once the run has run (the kernels its device parts used)."""
        if self.enabled and self.run_id is not None and params:
            from mlflow.entities import Param

            self._guard(self.client.log_batch, self.run_id, [], [Param(k, _param(v)) for k, v in params.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled and self.run_id is not None:
            for key, value in tags.items():
                self._guard(self.client.set_tag, self.run_id, key, value)

    # ------------------------------------------------------------------ artifacts and the end
    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.enabled and self.run_id is not None:
            self._guard(self.client.log_artifact, self.run_id, str(path), folder)

    def close(self, status: str = "FINISHED", spill_dir: Path | None = None, reason: str | None = None) -> None:
        """Flush what is buffered and end the run (a failed one with its reason as a tag); metrics that cannot
        reach the store are saved as JSON."""
        if not self.enabled:
            return
        if reason is not None:
            self.set_tags({FAILURE_TAG: reason[:5000]})
        if not self.flush() and spill_dir is not None:
            spill_dir.mkdir(parents=True, exist_ok=True)
            target = spill_dir / "unlogged-metrics.json"
            write_text(target, json.dumps([{"key": m.key, "value": m.value, "step": m.step} for m in self.buffer]))
            print(f"sflam: warning: {len(self.buffer)} metric values could not reach MLflow; saved to {target}",
                  file=sys.stderr)
        if self.run_id is not None:
            self._guard(self.client.set_terminated, self.run_id, status)


# --------------------------------------------------------------------------- run lifecycle


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return None


def owner_tags() -> dict[str, str]:
    """Who runs this MLflow run: process id, its start time (process ids are reused) and host."""
    pid = os.getpid()
    return {PID_TAG: str(pid), HOST_TAG: socket.gethostname(), STARTED_TAG: repr(_process_started(pid))}


def clean_stale_runs(client: Any) -> list[str]:
    """Mark FAILED every RUNNING run of this host whose process has ended; returns their run ids.

    Runs of other hosts are left alone: whether their process lives cannot be told from here.
    """
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiments:
        return []
    host, cleaned = socket.gethostname(), []
    for run in client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=5000):
        tags = run.data.tags
        if tags.get(HOST_TAG) != host or PID_TAG not in tags:
            continue
        pid = int(tags[PID_TAG])
        started = _process_started(pid)
        if started is not None and repr(started) == tags.get(STARTED_TAG):
            continue  # its process is still running
        client.set_tag(run.info.run_id, FAILURE_TAG,
                       f"its process (pid {pid} on {host}) ended without closing the run; resume it with --resume")
        client.set_terminated(run.info.run_id, "FAILED")
        cleaned.append(run.info.run_id)
    return cleaned


def clean_runs(config: ExperimentConfig) -> tuple[str, list[str]]:
    """`sflam runs --clean`: the tracking store's URI and the stale runs marked FAILED."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(config)
    return uri, clean_stale_runs(MlflowClient(uri))
