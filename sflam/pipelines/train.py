"""One training experiment, end to end: run it (local or Ray), record it in MLflow, write its outputs.

Outputs in <output_dir>/<name>/: config.yaml (resolved), summary.json, rounds.csv, allocation.csv
(every device of every round), rounds.png (accuracy, loss, latency and energy per round) and the
adapters as safetensors; the same files are the MLflow run's artifacts. Every file is written
atomically; checkpoint.pt (after every round) lets `--resume` continue an interrupted run exactly.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sflam.pipelines.figures import save_figure
from sflam.platform.assembly import Experiment
from sflam.platform.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from sflam.platform.config import ExperimentConfig, save_config
from sflam.platform.files import atomic_path
from sflam.platform.local import run_local
from sflam.platform.results import Resume, RoundMetrics, RunResult
from sflam.platform.tracking import Tracker, run_label

ROUND_METRICS = ("train_loss", "train_accuracy", "samples", "uplink_bits", "downlink_bits", "wall_s",
                 "round_latency_s", "comm_latency_s", "compute_latency_s", "energy_j", "bits_mean", "bits_min",
                 "bits_max", "power_mean_w", "power_max_w", "bandwidth_min_hz", "bandwidth_max_hz", "objective",
                 "selected", "finished", "dropped", "late")


def round_values(metrics: RoundMetrics) -> dict[str, float | None]:
    values: dict[str, float | None] = {key: getattr(metrics, key) for key in ROUND_METRICS}
    values["accuracy"] = metrics.eval_accuracy
    values["loss"] = metrics.eval_loss
    values["leakage"] = metrics.leakage
    values.update(metrics.leakage_metrics)
    return values


def run_experiment(config: ExperimentConfig, progress: Callable[[RoundMetrics], None] | None = None,
                   announce: Callable[[str], None] | None = None, experiment=None,
                   checkpoint: Callable[[Resume], None] | None = None, resume: Resume | None = None) -> RunResult:
    """Run every round on the configured runtime (from a checkpoint's round when resuming)."""
    if config.runtime == "ray":  # the Ray runtime builds the experiment while its actors start
        from sflam.actors.runtime import run_ray  # Ray is imported only by runs that use it

        return run_ray(config, progress=progress, experiment=experiment, announce=announce, checkpoint=checkpoint,
                       resume=resume)
    exp = experiment or Experiment.build(config)
    return run_local(config, progress=progress, experiment=exp, checkpoint=checkpoint, resume=resume)


def train(config: ExperimentConfig, run_name: str | None = None, parent_run_id: str | None = None,
          progress: Callable[[RoundMetrics], None] | None = None, announce: Callable[[str], None] | None = None,
          out_dir: Path | None = None, experiment_name: str | None = None,
          runner: Callable[..., RunResult] | None = None, tags: dict[str, str] | None = None,
          resume: bool = False) -> RunResult:
    """Run, track and save one experiment, checkpointing every round; `resume` continues the interrupted run
    from its checkpoint in the same MLflow run. A failed run is recorded as FAILED (reason tag) with what it
    completed."""
    target = out_dir or Path(config.output_dir) / config.name
    target.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(target)
    state, run_id = load_checkpoint(path, config) if resume else (None, None)
    tracker = Tracker(config, run_name=run_label(run_name or config.name, config.seed), parent_run_id=parent_run_id,
                      experiment=experiment_name, tags=tags, resume_run_id=run_id)
    logged = tracker.logged_steps("train_loss") if state is not None else set()
    if state is not None:  # rounds the interrupted run completed but never got to the store
        for metrics in state.rounds:
            if metrics.round not in logged:
                tracker.log_metrics(round_values(metrics), step=metrics.round)
        if announce is not None:
            announce(f"resuming {config.name} after round {state.next_round} of {config.train.rounds} "
                     f"(MLflow run {tracker.run_id or '-'})")

    def on_round(metrics: RoundMetrics) -> None:
        if metrics.round not in logged:
            tracker.log_metrics(round_values(metrics), step=metrics.round)
        if progress is not None:
            progress(metrics)

    def checkpoint(round_state: Resume) -> None:
        save_checkpoint(path, round_state, config, tracker.run_id)

    try:
        result = (runner or run_experiment)(config, on_round, announce, checkpoint=checkpoint, resume=state)
    except BaseException as failure:
        partial = getattr(failure, "partial", None)
        if partial is not None and partial.rounds:
            write_outputs(partial, config, target, tracker)
        pruned = type(failure).__name__ == "TrialPruned"
        interrupted = isinstance(failure, KeyboardInterrupt)
        reason = "interrupted" if interrupted else f"{type(failure).__name__}: {str(failure)[:1000]}"
        tracker.close("KILLED" if pruned or interrupted else "FAILED", spill_dir=target,
                      reason=None if pruned else reason)
        raise
    result.mlflow_run_id = tracker.run_id
    write_outputs(result, config, target, tracker)
    tracker.close("FINISHED", spill_dir=target)
    return result


def record(result: RunResult, config: ExperimentConfig, run_name: str | None = None,
           parent_run_id: str | None = None, out_dir: Path | None = None, experiment_name: str | None = None,
           tags: dict[str, str] | None = None) -> RunResult:
    """Record a run that finished elsewhere (a Ray task): the driver alone talks to MLflow."""
    target = out_dir or Path(config.output_dir) / config.name
    target.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(config, run_name=run_label(run_name or config.name, config.seed), parent_run_id=parent_run_id,
                      experiment=experiment_name, tags=tags)
    for metrics in result.rounds:
        tracker.log_metrics(round_values(metrics), step=metrics.round)
    result.mlflow_run_id = tracker.run_id
    write_outputs(result, config, target, tracker)
    tracker.close("FINISHED", spill_dir=target)
    return result


def write_outputs(result: RunResult, config: ExperimentConfig, target: Path, tracker: Tracker) -> None:
    if result.device_memory_bytes is not None and result.rounds:
        tracker.log_metrics({"device_memory_bytes": result.device_memory_bytes}, step=result.rounds[-1].round)
    tracker.log_params(result.kernels)
    summary = result.summary()
    tracker.log_metrics({f"final_{k}": v for k, v in summary.items() if isinstance(v, (int, float))},
                        step=len(result.rounds))
    with atomic_path(target / "config.yaml") as tmp:
        save_config(config, tmp)
    result.write_json(target / "summary.json")
    files = [target / "config.yaml", target / "summary.json", write_rounds_csv(result, target / "rounds.csv")]
    allocation = write_allocation_csv(result, target / "allocation.csv")
    if allocation is not None:
        files.append(allocation)
    try:
        files.append(plot_rounds(result, target / "rounds.png", title=f"{config.name} ({config.model.name})"))
        if any(r.plan is not None for r in result.rounds):
            files.append(plot_bits_vs_gain(result, target / "bits_vs_gain.png",
                                           title=f"{config.name}: activation bits against channel gain"))
    except Exception as exc:  # a plot is never worth a failed run
        print(f"sflam: warning: could not draw the round plots ({exc})", file=sys.stderr)
    files.extend(save_adapters(result, target))
    for path in files:
        tracker.log_artifact(path)


def write_rounds_csv(result: RunResult, path: Path) -> Path:
    rows = result.rounds_as_dicts()
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        kept = [k for k in rows[0] if k not in ("step_losses", "leakage_metrics")] if rows else []
        writer = csv.DictWriter(handle, fieldnames=kept)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in kept})
    return path


def write_allocation_csv(result: RunResult, path: Path) -> Path | None:
    rows = [{"round": r.round, **row} for r in result.rounds if r.plan is not None for row in r.plan.table()]
    if not rows:
        return None
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_adapters(result: RunResult, target: Path) -> list[Path]:
    from safetensors.torch import save_file

    out = []
    for name, tensors in (("device_adapter", result.device_adapter), ("server_state", result.server_state)):
        if tensors:
            path = target / f"{name}.safetensors"
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            out.append(path)
    return out


def plot_rounds(result: RunResult, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in result.rounds]
    evaluated = [r for r in result.rounds if r.eval_accuracy is not None]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=110)
    ax = axes[0, 0]
    ax.plot(rounds, [r.train_accuracy for r in result.rounds], color="tab:gray", alpha=0.6, label="train (round)")
    ax.plot([r.round for r in evaluated], [r.eval_accuracy for r in evaluated], "o-", color="tab:blue",
            label="test")
    ax.set_title("accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(rounds, [r.train_loss for r in result.rounds], color="tab:gray", alpha=0.6, label="train (round)")
    ax.plot([r.round for r in evaluated], [r.eval_loss for r in evaluated], "o-", color="tab:orange", label="test")
    ax.set_title("cross-entropy loss")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.legend()
    ax = axes[1, 0]
    if all(r.round_latency_s is not None for r in result.rounds):
        ax.plot(rounds, [r.round_latency_s for r in result.rounds], label="round latency")
        ax.plot(rounds, [r.comm_latency_s for r in result.rounds], label="communication (longest device)")
        ax.plot(rounds, [r.compute_latency_s for r in result.rounds], label="computation (device + server)")
        ax.legend()
    ax.set_title("simulated latency per round")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax = axes[1, 1]
    if all(r.energy_j is not None for r in result.rounds):
        ax.plot(rounds, [r.energy_j for r in result.rounds], color="tab:green")
    ax.set_title("device energy per round")
    ax.set_xlabel("round")
    ax.set_ylabel("joules (all selected devices)")
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(fig, path, title)


def plot_bits_vs_gain(result: RunResult, path: Path, title: str) -> Path:
    """Every round's chosen bits against each device's channel gain (the allocator gives poor channels fewer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    planned = [r for r in result.rounds if r.plan is not None]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    cmap = plt.get_cmap("viridis")
    rng = np.random.default_rng(0)
    for i, r in enumerate(planned):
        bits = np.asarray(r.plan.allocation.bits, dtype=float)
        jitter = rng.uniform(-0.15, 0.15, bits.shape)  # overlapping points stay visible
        ax.scatter(r.plan.gain, bits + jitter, s=14, color=cmap(i / max(len(planned) - 1, 1)), alpha=0.7,
                   label=f"round {r.round}" if len(planned) <= 8 else None)
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("channel power gain g_k")
    ax.set_ylabel("activation bits q_k")
    if len(planned) > 8:
        scalar = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(planned[0].round, planned[-1].round))
        fig.colorbar(scalar, ax=ax, label="round")
    else:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    return save_figure(fig, path)
