"""The search space as data: `study.space` maps dotted config keys to Optuna distributions."""

from __future__ import annotations

from typing import Any

import optuna

from sflam.platform.config import ExperimentConfig, config_from_dict


def suggest(trial: optuna.trial.BaseTrial, space: dict[str, Any]) -> dict[str, Any]:
    """Dotted overrides for one trial, drawn from the space."""
    values: dict[str, Any] = {}
    for key, spec in space.items():
        kind = spec["type"]
        if kind == "categorical":
            values[key] = trial.suggest_categorical(key, spec["choices"])
        elif kind == "int":
            values[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                            log=bool(spec.get("log", False)))
        else:
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                              log=bool(spec.get("log", False)))
    return values


def trial_config(base: ExperimentConfig, overrides: dict[str, Any], number: int) -> ExperimentConfig:
    """The base config with a trial's values; invalid combinations raise ConfigError (the trial fails)."""
    tree = base.to_dict()
    tree["name"] = f"{base.name}-trial{number}"
    return config_from_dict(tree, overrides)


def check_space(base: ExperimentConfig) -> None:
    """Every key of the space must be a config key: try each bound and choice before the study starts."""
    for key, spec in base.study.space.items():
        probes = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        if spec["type"] == "int":
            probes = [int(v) for v in probes]
        for value in probes:
            config_from_dict(base.to_dict(), {key: value})
