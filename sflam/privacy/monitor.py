"""A run's leakage, measured while it trains: every `privacy.evaluate_every` rounds, the monitoring attacks against
the current global device adapter, on the run's own built device part, data and defences."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from sflam.platform.assembly import Experiment
from sflam.platform.build import validate
from sflam.platform.device import TOP
from sflam.platform.strategies import Adapter
from sflam.privacy.build import AttackSetup, setup_from_parts
from sflam.privacy.suite import run_suite


@contextlib.contextmanager
def adapter_loaded(part: torch.nn.Module, adapter: Adapter) -> Iterator[None]:
    """The device part's own tensors set to `adapter` within (the attacks run the module itself); restored after."""
    params = dict(part.named_parameters())
    names = [n for n in adapter if not n.startswith(TOP) and n in params]
    saved = {n: params[n].detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            params[n].copy_(adapter[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


class LeakageMonitor:
    """The monitoring attacks (`privacy.monitor`) over the experiment's device part: the auxiliary set's and the
    victims' messages are made anew each time (the adapter changed), the attacker's budgets as configured."""

    def __init__(self, exp: Experiment) -> None:
        config = exp.config
        self.config = config
        self.part = exp.device.part
        self.privacy = dataclasses.replace(config.privacy, attacks=list(config.privacy.monitor))
        self.setup: AttackSetup = setup_from_parts(config, validate(config), exp.data, exp.device.part,
                                                   aux_samples=config.privacy.monitor_aux_samples)

    def measure(self, adapter: Adapter) -> dict[str, float]:
        """`leakage` (the best attack's headline metric: token accuracy or SSIM) and each attack's metrics."""
        with adapter_loaded(self.part, adapter):
            suite = run_suite(self.setup, self.privacy)
        best = suite.best()
        out = {"leakage": float(best.metrics[suite.headline])}
        for result in suite.results:
            out.update({f"leakage_{result.name}_{k}": float(v) for k, v in result.metrics.items()})
        return out
