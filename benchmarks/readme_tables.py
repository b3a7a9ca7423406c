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
CLAIMS = (("memory_vs_fl", "device memory vs fl", "at most 0.38 (−62 %)", lambda v: v <= 0.38),
          ("comm_latency_vs_sfl", "communication latency vs sfl", "at most 0.53 (−47 %)", lambda v: v <= 0.53),
          ("energy_efficiency_vs_sfl", "energy efficiency vs sfl", "at least 3.1×", lambda v: v >= 3.1),
          ("accuracy_vs_fl_points", "accuracy vs fl (points)", "within 1 point", lambda v: v >= -1.0))


def headline(rows: list[dict]) -> list[str]:
    ours = next(r for r in rows if r["method"] == "sflam")
    lines = ["| sflam | measured (mean ± 95 % CI) | paper's claim | met by the mean |", "|---|---:|---|---|"]
    for key, label, claim, met in CLAIMS:
        if ours.get(key) is None:
            continue
        lines.append(f"| {label} | {with_ci(ours, key, '.3g')} | {claim} | {'yes' if met(ours[key]) else 'no'} |")
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
