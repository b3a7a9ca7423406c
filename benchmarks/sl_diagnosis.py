"""Why vanilla split learning (`sl`) collapsed to the majority class (issue 24, item 2).

Each point is a real run of `sl` or `sfl` (runtime local, the method's own settings of `method_config`) on a
config shortened by overrides; per round it records the training loss and accuracy, and at the end the test
accuracy, the majority class's share of the test set and the predicted-class histogram on the test set.

Run:
  OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/sl_diagnosis.py -c configs/default.yaml \
      --lrs 3e-3 3e-4 1e-4 train.rounds=6 data.eval_samples=512
Writes benchmarks/results/sl_diagnosis.md (--out to change) with the command that made it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sflam.pipelines.baselines import RUNNERS, method_config
from sflam.platform.assembly import Experiment, evaluation_batches
from sflam.platform.config import ExperimentConfig, load_config
from sflam.platform.local import run_local
from sflam.platform.results import RoundMetrics


def predictions(exp: Experiment, adapter: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true classes of the deployed pipeline on the held-out set (as `Experiment.evaluate`)."""
    from sflam.platform.assembly import EVAL_DEVICE
    from sflam.platform.messages import UPLINK, codec_generator
    from sflam.platform.server import ServerRunner

    predicted, truth = [], []
    for number, batch in evaluation_batches(exp.config, exp.data):
        message = exp.device.infer(adapter, batch, codec_generator(exp.config.seed, 0, number, EVAL_DEVICE, UPLINK))
        with torch.no_grad():
            hidden, mask, labels = ServerRunner.assemble([message])
            logits = exp.server.part(hidden, mask)
        predicted.append(logits.argmax(-1).numpy())
        truth.append(labels.numpy())
    return np.concatenate(predicted), np.concatenate(truth)


def run_point(config: ExperimentConfig, method: str) -> dict[str, Any]:
    """One run of a method; its per-round figures and the predicted-class histogram at the end."""
    cfg = method_config(config, method)
    exp = Experiment.build(cfg, schedule="sequential" if method == "sl" else "lockstep")
    rounds: list[RoundMetrics] = []
    started = time.perf_counter()
    if method == "sl":
        from sflam.pipelines.baselines import SequentialBackend
        from sflam.platform.engine import Engine

        result = Engine(cfg, SequentialBackend(exp), planner=exp.planner, data=exp.data).run(rounds.append)
    else:
        assert method not in RUNNERS, method
        result = run_local(cfg, rounds.append, experiment=exp)
    predicted, truth = predictions(exp, result.device_adapter)
    classes = int(max(predicted.max(), truth.max())) + 1
    return {"method": method, "device_lr": cfg.train.device_lr, "server_lr": cfg.train.server_lr,
            "accuracy": float(result.accuracy), "majority": float(np.bincount(truth, minlength=classes).max()
                                                                   / len(truth)),
            "predicted": np.bincount(predicted, minlength=classes).tolist(),
            "train_loss": [r.train_loss for r in rounds], "train_acc": [r.train_accuracy for r in rounds],
            "wall_s": time.perf_counter() - started}


def series(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/default.yaml")
    parser.add_argument("--methods", nargs="+", default=["sl", "sfl"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 3e-4, 1e-4],
                        help="learning rates, each set as both train.device_lr and train.server_lr")
    parser.add_argument("--pairs", nargs="*", default=[],
                        help="extra (device_lr,server_lr) points for sl only, e.g. 3e-3,3e-4")
    parser.add_argument("--out", default="benchmarks/results/sl_diagnosis")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config (runtime=local is added)")
    args = parser.parse_args(argv)
    base = ["runtime=local", "tracking.enabled=false", *args.overrides]
    points = [(m, lr, lr) for lr in args.lrs for m in args.methods]
    points += [("sl", float(d), float(s)) for d, s in (p.split(",") for p in args.pairs)]
    rows = []
    for method, device_lr, server_lr in points:
        config = load_config(args.config, [*base, f"train.device_lr={device_lr}", f"train.server_lr={server_lr}"])
        row = run_point(config, method)
        rows.append(row)
        print(f"{method} device_lr={device_lr:g} server_lr={server_lr:g}: acc {row['accuracy']:.4f} "
              f"(majority {row['majority']:.4f}) predicted {row['predicted']} "
              f"train loss [{series(row['train_loss'])}] train acc [{series(row['train_acc'])}] "
              f"{row['wall_s']:.0f} s", flush=True)
    command = "OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/sl_diagnosis.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    lines = [f"# sl against sfl at several learning rates ({args.config})", "", "```bash", command, "```", "",
             "| method | device_lr | server_lr | test acc | majority share | predicted classes | train loss by round "
             "| train acc by round |", "|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['device_lr']:g} | {r['server_lr']:g} | {r['accuracy']:.4f} | "
                     f"{r['majority']:.4f} | {r['predicted']} | "
                     f"{series(r['train_loss'])} | {series(r['train_acc'])} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
