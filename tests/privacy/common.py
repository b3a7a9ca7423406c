"""Attack setups for the privacy tests, built once per test session and configuration."""

from __future__ import annotations

import functools

from sflam.platform.config import ExperimentConfig, load_config
from sflam.privacy.build import AttackSetup, build_setup

TEXT = ("model.name=tiny-bert", "data.dataset=rotten_tomatoes", "data.num_devices=50", "model.max_length=32")
IMAGE = ("model.name=tiny-vit", "data.dataset=digits", "data.num_devices=50")


def config_of(*overrides: str) -> ExperimentConfig:
    return load_config(None, ["tracking.enabled=false", "output_dir=/nonexistent-privacy-tests", *overrides])


@functools.cache
def setup_of(*overrides: str) -> AttackSetup:
    """The attack setup of a configuration (no saved adapters: a freshly built device part)."""
    return build_setup(config_of(*overrides), adapters=False)
