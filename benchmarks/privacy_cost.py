"""What each defence costs a run (issue 22): accuracy, latency, energy and uplink of the privacy sweep's points.

One factor at a time around a baseline, each point a real training run (`sflam run --seeds N`, runtime local,
reduced rounds), its mean and 95 % interval over the seeds:

- the cut layer (the sweep's cuts, at the config's activation bits),
- the smashed data's bits (2, 4, 32 at the config's cut),
- Gaussian noise with per-sample clipping (the sweep's σ values; C = the median norm of that setting's
  noise-free messages, read from the sweep's JSON so that training and attack see the same noise),
- NoPeek (distance correlation in the device loss, weight --nopeek) and the U-shaped split (split.head=device).

Every point fixes its bit width (`allocation.bits=[q]`): the allocator then chooses power and bandwidth only, so
the bits the sweep attacked are the bits the run sends.

Run (after benchmarks/privacy_sweep.py wrote its JSON for the modality):
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy_cost.py --only text --seeds 3 --rounds 6
Writes benchmarks/results/privacy_cost_<modality>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sflam.pipelines.seeds import with_ci

CONFIGS = {"text": "configs/default.yaml", "image": "configs/paper-vit.yaml"}
CUTS = {"text": (0, 1, 3, 6), "image": (0, 1, 4)}
BASE_CUT = {"text": 1, "image": 0}
SWEEP = "benchmarks/results/privacy_sweep_{}.json"
OUT = "benchmarks/results/privacy_cost_{}"


def clip_norms(modality: str) -> dict[tuple[int, int], float]:
    """C per (cut, bits): the median norm of the noise-free messages the sweep measured."""
    path = Path(SWEEP.format(modality))
    if not path.exists():
        sys.exit(f"{path} is missing: run benchmarks/privacy_sweep.py --only {modality} "
                 f"--out {path.with_suffix('')} first")
    rows = json.loads(path.read_text())
    return {(r["cut"], r["bits"]): r["clip_norm"] for r in rows if r["sigma"] and r["clip_norm"]}


def points(modality: str, bits: int, sigmas: list[float], nopeek: float) -> list[tuple[str, list[str]]]:
    """(label, overrides) for every point: the baseline first, then one factor changed at a time."""
    cut = BASE_CUT[modality]
    norms = clip_norms(modality) if sigmas else {}
    out = [(f"baseline: cut {cut}, {bits} bits", [])]
    out += [(f"cut {c}", [f"split.cut_layer={c}"]) for c in CUTS[modality] if c != cut]
    out += [(f"{q} bits", [f"quant.activation_bits={q}"]) for q in (2, 4, 32) if q != bits]
    for sigma in sigmas:
        clip = norms.get((cut, bits))
        if clip is None:
            sys.exit(f"the sweep's JSON has no clip norm for cut {cut} at {bits} bits")
        out.append((f"noise σ={sigma:g} (C={clip:.4g})",
                    [f"privacy.noise_sigma={sigma}", f"privacy.clip_norm={clip}"]))
    if nopeek > 0:
        out.append((f"NoPeek weight {nopeek:g}", [f"privacy.nopeek_weight={nopeek}"]))
    out.append(("U-shaped split (head on the device)", ["split.head=device"]))
    return [(label, pinned(overrides, cut, bits)) for label, overrides in out]


def pinned(overrides: list[str], cut: int, bits: int) -> list[str]:
    """A point's overrides with the cut and the smashed data's bits fixed: `allocation.bits=[q]` leaves the
    allocator power and bandwidth only, so every message of the run travels at the point's bit width (and the
    distortion budget is that width's, the only one it can meet)."""
    out = list(overrides)
    if not any(o.startswith("split.cut_layer=") for o in out):
        out.insert(0, f"split.cut_layer={cut}")
    q = next((int(o.split("=")[1]) for o in out if o.startswith("quant.activation_bits=")), bits)
    if q == bits:
        out.append(f"quant.activation_bits={bits}")
    return [*out, f"allocation.bits=[{q}]", f"allocation.distortion_bits={q}"]


def run_point(config: str, overrides: list[str], seeds: int, common: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="sflam-cost-") as folder:
        path = Path(folder) / "summary.json"
        command = [sys.executable, "-m", "sflam", "run", "-c", config, "--seeds", str(seeds), "--json", str(path),
                   *common, *overrides]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return json.loads(path.read_text())


def markdown(modality: str, rows: list[dict], command: str, common: list[str]) -> str:
    model = "MiniLM-L6, Rotten Tomatoes" if modality == "text" else "DINOv2 ViT-S/14, MNIST"
    lines = [f"# What the defences cost: {model}",
             "", f"Command: `{command}`; every run with `{' '.join(common)}` (mean ± 95 % interval over "
             f"{rows[0]['summary'].get('seeds', 1)} seeds); each point sends its smashed data at the bits it names "
             "(`allocation.bits=[q]`, the allocator choosing power and bandwidth only).", "",
             "| point | accuracy | round latency s | energy J/round | uplink Mbit/round | ε | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        s = dict(row["summary"])
        for key in ("uplink_bits_per_round",):
            if s.get(key) is not None:
                s[key] = s[key] / 1e6
                s[f"{key}_ci95"] = (s.get(f"{key}_ci95") or float("nan")) / 1e6
        eps = s.get("privacy_epsilon")
        lines.append(f"| {row['label']} | {with_ci(s, 'accuracy', '.4f')} | {with_ci(s, 'round_latency_s', '.3g')} "
                     f"| {with_ci(s, 'energy_j', '.3g')} | {with_ci(s, 'uplink_bits_per_round', '.4g')} "
                     f"| {'-' if eps is None else format(eps, '.3g')} | {row['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=tuple(CONFIGS), required=True, help="the modality")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6, help="train.rounds of every run (the configs': 30)")
    parser.add_argument("--sigmas", type=float, nargs="*", default=[0.003, 0.03])
    parser.add_argument("--nopeek", type=float, default=0.5, help="NoPeek weight of its point (0: no point)")
    parser.add_argument("--bits", type=int, default=8, help="the configs' activation bits (the baseline's)")
    args = parser.parse_args()
    modality = args.only
    common = [f"train.rounds={args.rounds}", f"train.eval_every={args.rounds}", "runtime=local",
              "tracking.enabled=false"]
    command = "OMP_NUM_THREADS=1 python benchmarks/privacy_cost.py " + " ".join(sys.argv[1:])
    rows = []
    out = Path(OUT.format(modality))
    for label, overrides in points(modality, args.bits, args.sigmas, args.nopeek):
        started = time.perf_counter()
        summary = run_point(CONFIGS[modality], overrides, args.seeds, common)
        rows.append({"label": label, "overrides": overrides, "summary": {k: v for k, v in summary.items()
                                                                         if k != "runs"},
                     "wall_s": time.perf_counter() - started})
        print(json.dumps({"label": label, "accuracy": summary.get("accuracy"),
                          "ci": summary.get("accuracy_ci95"), "wall_s": round(rows[-1]["wall_s"], 1)}), flush=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str) + "\n")  # progress so far
    out.with_suffix(".md").write_text(markdown(modality, rows, command, common))
    print(f"wrote {out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
