"""Bit identity of runs across a change of structure: record a fingerprint of each run, check it later.

A fingerprint is the SHA-256 of every adapter and server tensor's bytes and of every per-round metric (each
float's exact bits; wall-clock times left out), and the figures themselves for a readable diff. Used to show
that a refactor changes no number: record at the starting commit, check at the end, on the same machine
(bit identity holds for the same kernels; another CPU rounds differently).

    .venv/bin/python benchmarks/identity.py record   # writes benchmarks/results/identity.json
    .venv/bin/python benchmarks/identity.py check    # runs again, compares, exit 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "identity.json"
RUNS = {
    "smoke-local": ("configs/smoke.yaml", ["runtime=local"]),
    "smoke-ray": ("configs/smoke.yaml", ["runtime=ray"]),
    "default-3-rounds": ("configs/default.yaml", ["train.rounds=3", "train.eval_every=3"]),
}
SKIPPED = {"wall_s", "plan"}


def _bits(value: object) -> object:
    """Floats by their exact bits (a readable repr beside them would hide a last-bit change)."""
    if isinstance(value, float):
        return struct.pack("<d", value).hex()
    if isinstance(value, list):
        return [_bits(v) for v in value]
    return value


def fingerprint(name: str, path: str, overrides: list[str], out: Path) -> dict[str, object]:
    import torch

    from sflam.pipelines.train import run_experiment
    from sflam.platform.config import load_config

    config = load_config(ROOT / path, [*overrides, f"output_dir={out}", "tracking.enabled=false",
                                       f"name=identity-{name}"])
    result = run_experiment(config)
    digest = hashlib.sha256()
    tensors = {}
    for group, state in (("device", result.device_adapter), ("server", result.server_state)):
        for key in sorted(state):
            data = state[key].detach().contiguous().cpu().to(torch.float32).numpy().tobytes()
            digest.update(f"{group}/{key}".encode())
            digest.update(data)
            tensors[f"{group}/{key}"] = hashlib.sha256(data).hexdigest()[:16]
    rounds = [{f.name: _bits(getattr(r, f.name)) for f in fields(r) if f.name not in SKIPPED} for r in result.rounds]
    plans = [r.plan.table() if r.plan is not None else None for r in result.rounds]
    digest.update(json.dumps([rounds, plans], sort_keys=True, default=str).encode())
    return {"sha256": digest.hexdigest(), "accuracy": result.accuracy, "tensors": tensors, "rounds": rounds,
            "plans": json.loads(json.dumps(plans, default=str))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["record", "check"])
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "identity")
    args = parser.parse_args()
    found = {name: fingerprint(name, *RUNS[name], args.out) for name in args.runs}
    if args.action == "record":
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(found, indent=1) + "\n")
        print(f"recorded {', '.join(found)} in {RESULT}")
        return 0
    recorded = json.loads(RESULT.read_text())
    failed = False
    for name, now in found.items():
        before = recorded[name]
        same = now["sha256"] == before["sha256"]
        print(f"{name}: {'identical' if same else 'DIFFERENT'} ({now['sha256'][:16]})")
        if not same:
            failed = True
            for key in ("tensors", "rounds", "plans"):
                if now[key] != before[key]:
                    print(f"  {key} differ", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
