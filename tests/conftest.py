"""Shared fixtures: tiny configs and quiet libraries."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from sflam.platform.build import quiet_libraries
from sflam.platform.config import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]

quiet_libraries()


def tiny_config(*overrides: str) -> ExperimentConfig:
    """A fast experiment on the synthetic task (a few devices, a few rounds)."""
    base = ["model.name=tiny-llama", "data.dataset=synthetic", "data.num_devices=20", "data.synthetic_samples=600",
            "train.devices_per_round=4", "train.rounds=3", "train.local_steps=2", "train.batch_size=8",
            "train.eval_every=3", "train.device_lr=0.005", "train.server_lr=0.005", "quant.weights=fp32"]
    return load_config(None, base + list(overrides))


@pytest.fixture(scope="session", autouse=True)
def cost_cache(tmp_path_factory: pytest.TempPathFactory):
    """The test session's own cost cache (sflam.platform.cache): tests measure, never read the user's cache."""
    from sflam.platform.cache import CACHE_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("sflam-cache")))
        yield


@pytest.fixture
def repo_root() -> Path:
    return ROOT


SEED_ENV = "SFLAM_TEST_SEED"


@pytest.fixture
def rng() -> random.Random:
    """A randomised test's generator: its seed is printed (pytest shows it with a failure) and comes from
    SFLAM_TEST_SEED when set, so `SFLAM_TEST_SEED=<seed> pytest <test>` repeats the failing draw."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    print(f"random draws of this test: seed {seed} ({SEED_ENV}={seed} repeats them)")
    return random.Random(seed)
