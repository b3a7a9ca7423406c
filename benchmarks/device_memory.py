"""Device memory of the packaged MiniLM-L6 device part (cut layer 1) under each weight quantization mode,
and of the whole model on the device (cut 6), measured on the real model (docs/concepts/system-model.md): the peak
of one full
training step (forward, backward with the received gradient, AdamW step) from the CPU allocator's events.

Run: make bench   (or .venv/bin/python benchmarks/device_memory.py [--cut-layer 1] [--batch-size 8])
Writes benchmarks/results/device_memory.{md,json}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sflam.platform.assembly import Experiment
from sflam.platform.build import quiet_libraries
from sflam.platform.config import load_config

MODES = ("fp32", "bf16", "int8", "nf4", "fp4")


def measure(overrides: list[str]):
    config = load_config("configs/default.yaml", ["data.num_devices=20", "train.devices_per_round=4", *overrides])
    return Experiment.build(config).memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cut-layer", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    quiet_libraries()
    common = [f"split.cut_layer={args.cut_layer}", f"train.batch_size={args.batch_size}"]
    rows = [(f"device part, cut {args.cut_layer}, {mode}", measure([*common, f"quant.weights={mode}"]))
            for mode in MODES]
    whole = measure(["split.cut_layer=6", f"train.batch_size={args.batch_size}", "quant.weights=fp32"])
    rows.append(("whole model on device (FL), fp32", whole))
    mib = 1 / 2**20
    lines = ["| what | weights MiB | adapters+grads+AdamW MiB | activations and transients MiB | peak MiB |",
             "|---|---:|---:|---:|---:|"]
    for name, mem in rows:
        lines.append(f"| {name} | {mem.weights * mib:.2f} | {(mem.adapters + mem.gradients + mem.optimizer) * mib:.2f} "
                     f"| {mem.activations * mib:.2f} | {mem.total * mib:.2f} |")
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_memory.md").write_text("\n".join(lines) + "\n")
    (out / "device_memory.json").write_text(json.dumps(
        [{"what": name, "weights": m.weights, "adapters": m.adapters, "gradients": m.gradients,
          "optimizer": m.optimizer, "activations": m.activations, "peak": m.total} for name, m in rows], indent=2))
    print("\n".join(lines))

if __name__ == "__main__":
    main()
