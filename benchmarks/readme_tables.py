"""Render the README's comparison table and headline from a `sflam compare` JSON (no figure typed by hand).

Run: .venv/bin/python benchmarks/readme_tables.py results/default-compare/compare.json
The JSON is what `sflam compare -c configs/default.yaml --seeds 3` writes (compare.json beside the table).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sflam.pipelines.compare import format_rows
from sflam.pipelines.seeds import with_ci

# the paper's headline claims (arXiv 2504.09114): sflam against fl (memory, accuracy) and sfl (the rest)
# (key, label, the claim, its bound, +1: the measure must stay at most the bound, -1: at least)
CLAIMS = (("memory_vs_fl", "device memory vs fl", "at most 0.38 (−62 %)", 0.38, 1),
          ("comm_latency_vs_sfl", "communication latency vs sfl", "at most 0.53 (−47 %)", 0.53, 1),
          ("energy_efficiency_vs_sfl", "energy efficiency vs sfl", "at least 3.1×", 3.1, -1),
          ("accuracy_vs_fl_points", "accuracy vs fl (points)", "within 1 point", -1.0, -1))


def headline(rows: list[dict]) -> list[str]:
    """Each claim met by the mean, and by the whole 95 % interval (its worse end on the claim's side)."""
    ours = next(r for r in rows if r["method"] == "sflam")
    lines = ["| sflam | measured (mean ± 95 % CI) | paper's claim | met by the mean | met by the whole interval |",
             "|---|---:|---|---|---|"]
    for key, label, claim, bound, side in CLAIMS:
        if ours.get(key) is None:
            continue
        mean, half = ours[key], ours.get(f"{key}_ci95") or 0.0
        by_mean = side * (bound - mean) >= 0
        by_interval = side * (bound - (mean + side * half)) >= 0
        lines.append(f"| {label} | {with_ci(ours, key, '.3g')} | {claim} | {'yes' if by_mean else 'no'} | "
                     f"{'yes' if by_interval else 'no'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("compare_json", type=Path)
    args = parser.parse_args()
    rows = json.loads(args.compare_json.read_text())
    print("\n".join(format_rows(rows)))
    print()
    print("\n".join(headline(rows)))


if __name__ == "__main__":
    main()
