"""A study's outputs: its Pareto front as a table (CSV and markdown) and Optuna's plots of the front and of
parameter importances."""

from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna

from sflam.platform.config import OBJECTIVES, ExperimentConfig


def pareto_rows(study: optuna.Study, config: ExperimentConfig) -> list[dict[str, Any]]:
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        return []
    best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    rows = []
    for t in sorted(best, key=lambda t: t.number):
        row: dict[str, Any] = {"trial": t.number}
        row.update(dict(zip(config.study.objectives, t.values, strict=True)))
        row.update(t.params)
        row["mlflow_run_id"] = t.user_attrs.get("mlflow_run_id")
        rows.append(row)
    return rows


def write_front(rows: list[dict[str, Any]], path: Path) -> Path:
    keys = list(dict.fromkeys(k for row in rows for k in row)) or ["trial"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row.get(k):.4g}" if isinstance(row.get(k), float) else str(row.get(k))
                                       for k in keys) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return path


def _save(ax: Any, path: Path, size: tuple[float, float], plt: Any) -> Path:
    figure: Any = ax.figure
    figure.set_size_inches(*size)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_study(study: optuna.Study, config: ExperimentConfig, target: Path) -> list[Path]:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    objectives = config.study.objectives
    out = []
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(objectives) > 1 and completed:
        pick = [0, objectives.index("energy_j")] if "energy_j" in objectives[1:] else [0, 1]
        try:
            ax = ovm.plot_pareto_front(study, targets=lambda t: tuple(t.values[i] for i in pick),
                                       target_names=[objectives[i] for i in pick])
            names = [objectives[i] for i in pick]
            ax.set_title(f"{study.study_name}: Pareto front ({names[0]} vs {names[1]}; front in red)")
            ax.set_xlabel("test accuracy" if names[0] == "accuracy" else names[0])
            ax.set_ylabel("device energy per round (J)" if names[1] == "energy_j" else names[1])
            out.append(_save(ax, target / "pareto_front.png", (7.5, 5.5), plt))
        except Exception as exc:  # a plot is never worth a failed study
            print(f"sflam: warning: no Pareto-front plot ({exc})", file=sys.stderr)
    if len(completed) >= 2:
        try:
            sign = -1.0 if OBJECTIVES[objectives[0]] == "maximize" else 1.0  # importance of getting it better
            ax = ovm.plot_param_importances(study, target=lambda t: sign * t.values[0],
                                            target_name=f"{objectives[0]} ({OBJECTIVES[objectives[0]]})")
            out.append(_save(ax, target / "param_importances.png", (7.5, 4.5), plt))
        except Exception as exc:
            print(f"sflam: warning: no parameter-importance plot ({exc})", file=sys.stderr)
    return out
