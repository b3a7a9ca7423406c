"""Round checkpoints: `--resume` continues an interrupted run exactly.

After every completed round the engine hands over what continuing needs: the global device adapter, the
server part and its optimizer state, the strategy's state (server-optimizer moments), the next round,
the metrics so far and the MLflow run id. It is written to a temporary file in the same folder, flushed
to disk and renamed over the previous checkpoint, so a reader sees the last whole round or the one before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sflam.platform.config import ExperimentConfig, flatten
from sflam.platform.errors import ConfigError
from sflam.platform.files import atomic_path
from sflam.platform.results import Resume

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 2  # 2: results and plans pickled from their modules since the 0.2 layout
# keys that may differ between the interrupted run and its resumption without changing the result
RESUMABLE_CHANGES = ("tracking.", "ray.", "threads", "output_dir")


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
    try:
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:  # pickled by an earlier layout of the package
        raise ConfigError("--resume", str(path), f"a checkpoint written by this version ({exc}); run without "
                                                 "--resume") from None
    if payload.get("format") != FORMAT:
        raise ConfigError("--resume", str(path), f"a checkpoint of format {FORMAT} (this one has "
                                                 f"{payload.get('format')}); run without --resume")
    saved, current = flatten(payload["config"]), config.to_flat()
    defaults = ExperimentConfig().to_flat()  # a key added since the checkpoint was written had its default then
    for key in sorted(set(saved) | set(current)):
        then = saved.get(key, defaults.get(key))
        if key.startswith(RESUMABLE_CHANGES) or then == current.get(key):
            continue
        raise ConfigError(key, current.get(key), f"the interrupted run's value {then!r} to resume it "
                                                 f"exactly (checkpoint {path})")
    resume = Resume(next_round=payload["next_round"], global_adapter=payload["global_adapter"],
                    rounds=payload["rounds"], accuracy=payload["accuracy"], loss=payload["loss"],
                    wall_s=payload["wall_s"], strategy=payload["strategy"], server=payload["server"])
    return resume, payload["mlflow_run_id"]
