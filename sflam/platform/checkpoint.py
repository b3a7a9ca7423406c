"""Atomic files and round checkpoints: a crash never leaves a half-written file, `--resume` continues exactly.

After every completed round the engine hands over what continuing needs: the global device adapter, the
server part and its optimizer state, the strategy's state (server-optimizer moments), the next round,
the metrics so far and the MLflow run id. It is written to a temporary file in the same folder, flushed
to disk and renamed over the previous checkpoint, so a reader sees the last whole round or the one before.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sflam.platform.config import ExperimentConfig, flatten
from sflam.platform.engine import Resume
from sflam.platform.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1
# keys that may differ between the interrupted run and its resumption without changing the result
RESUMABLE_CHANGES = ("tracking.", "ray.", "threads", "output_dir")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`; renamed over it when the block succeeds, removed when it fails."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp's (and some writers') 0600 would hide results from the rest of a team
        with tmp.open("rb+") as written:  # on disk before the rename, so the rename never exposes an empty file
            os.fsync(written.fileno())
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def checkpoint_path(target: Path) -> Path:
    return target / CHECKPOINT_FILE


def save_checkpoint(path: Path, state: Resume, config: ExperimentConfig, mlflow_run_id: str | None) -> None:
    payload = {"format": FORMAT, "config": config.to_dict(), "mlflow_run_id": mlflow_run_id,
               "next_round": state.next_round, "global_adapter": state.global_adapter, "rounds": state.rounds,
               "accuracy": state.accuracy, "loss": state.loss, "wall_s": state.wall_s, "strategy": state.strategy,
               "server": state.server}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, config: ExperimentConfig) -> tuple[Resume, str | None]:
    """The run's last checkpoint, checked against the config it resumes with."""
    if not path.is_file():
        raise ConfigError("--resume", str(path), "a checkpoint of an interrupted run (none here: run without --resume)")
    # our own file, holding metrics and plans beside the tensors
    payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    saved, current = flatten(payload["config"]), config.to_flat()
    for key in sorted(set(saved) | set(current)):
        if key.startswith(RESUMABLE_CHANGES) or saved.get(key) == current.get(key):
            continue
        raise ConfigError(key, current.get(key), f"the interrupted run's value {saved.get(key)!r} to resume it "
                                                 f"exactly (checkpoint {path})")
    resume = Resume(payload["next_round"], payload["global_adapter"], payload["rounds"], payload["accuracy"],
                    payload["loss"], payload["wall_s"], payload["strategy"], payload["server"])
    return resume, payload["mlflow_run_id"]
