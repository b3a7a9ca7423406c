"""`sflam attack`: the configured attacks on a run's smashed data; the leakage report in <output_dir>/<name>/.

The device part is the run's (its saved `device_adapter.safetensors` loaded into a freshly built part)
when the run left one there, else freshly built from the config. The report (privacy.json,
privacy.md, and privacy.png for images) states the threat model, that labels are sent in the clear,
every attack's leakage, budget and wall time, and the (ε, δ) of the configured noise. It runs on
`threads` torch threads, one when 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from sflam.platform.config import ExperimentConfig
from sflam.privacy.accounting import guarantee, worst_case_releases
from sflam.privacy.build import build_setup
from sflam.privacy.report import PrivacyReport, write_report
from sflam.privacy.suite import run_suite


def run_attack(config: ExperimentConfig, announce: Callable[[str], None] | None = None, progress: bool = True,
               adapters: bool = True, out_dir: Path | None = None) -> PrivacyReport:
    """Build the target from the config (and the run's adapters), run the attacks, write the report."""
    previous = torch.get_num_threads()
    # threads 0: one thread. The attacks' matrix products are small; on the 2-core machine `sflam attack -c
    # configs/default.yaml` took 56 s of CPU on one thread and 200 s on two, beside other work (benchmark page)
    torch.set_num_threads(config.threads or 1)
    try:
        return _attack(config, announce, progress, adapters, out_dir)
    finally:
        torch.set_num_threads(previous)


def _attack(config: ExperimentConfig, announce: Callable[[str], None] | None, progress: bool, adapters: bool,
            out_dir: Path | None) -> PrivacyReport:
    started = time.perf_counter()
    privacy = config.privacy
    setup = build_setup(config, adapters=adapters, announce=announce)
    if announce is not None:
        source = f"the run's device adapter {setup.adapters}" if setup.adapters else "a freshly built device part"
        announce(f"attacking {source}: {len(setup.aux)} auxiliary samples (train split), {len(setup.victims)} "
                 f"victims (test split), attacks {', '.join(privacy.attacks)}")
    suite = run_suite(setup, privacy, progress=progress, announce=announce)
    releases = worst_case_releases(setup.bundle.shard_sizes, config.train.batch_size, config.train.local_steps,
                                   config.train.rounds)
    experiment = {"name": config.name, "model": config.model.name, "modality": setup.modality,
                  "cut_layer": config.split.cut_layer, "weights": config.quant.weights,
                  "activation_bits": config.quant.activation_bits,
                  "defence": {"clip_norm": privacy.clip_norm, "noise_sigma": privacy.noise_sigma,
                              "nopeek_weight": privacy.nopeek_weight}}
    report = PrivacyReport(
        experiment, suite, guarantee(privacy.noise_sigma, privacy.clip_norm, releases, privacy.delta),
        {"source": "train split", "samples": len(setup.aux), "seed": privacy.seed},
        {"source": "test split", "samples": len(setup.victims), "seed": privacy.seed},
        None if setup.adapters is None else str(setup.adapters), list(setup.notes), time.perf_counter() - started)
    write_report(report, setup, out_dir or Path(config.output_dir) / config.name)
    return report
