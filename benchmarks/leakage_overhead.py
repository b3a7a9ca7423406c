"""What per-round leakage measurement adds to a run's wall time (issue 22's target: at most 10 %).

The default experiment (MiniLM-L6, cut 1, Ray runtime) at reduced rounds, run as a user runs it, with and without
`privacy.evaluate_every` equal to the evaluation cadence (`train.eval_every`), in alternating order, each setting
`--repeats` times. The overhead is measured within the run: the summed wall time of the rounds (`rounds.csv`,
which includes each measured round's evaluation and leakage), so start-up, which the monitor does not touch, is
not in the ratio; the whole command's wall time is shown beside it.

Run: .venv/bin/python benchmarks/leakage_overhead.py [--rounds 10] [--every 5] [--repeats 2]
(writes benchmarks/results/leakage_overhead.md atomically)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sflam.platform.files import write_text

ROOT = Path(__file__).resolve().parents[1]


def one_run(out: Path, rounds: int, every: int, monitored: bool) -> dict[str, float]:
    overrides = [f"train.rounds={rounds}", f"train.eval_every={every}", f"output_dir={out}"]
    if monitored:
        overrides.append(f"privacy.evaluate_every={every}")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sflam", "run", "-c", "configs/default.yaml", *overrides,
                           "--json", str(out / "summary.json")], cwd=ROOT, capture_output=True, text=True)
    command_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"sflam run failed (exit {done.returncode}): {done.stderr[-2000:]}")
    with (out / "default" / "rounds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    summary = json.loads((out / "summary.json").read_text())
    return {"rounds_s": sum(float(r["wall_s"]) for r in rows), "command_s": command_s,
            "leakage": summary.get("leakage") or float("nan"), "accuracy": summary["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for monitored in ((False, True) if repeat % 2 == 0 else (True, False)):
                out = Path(tmp) / f"{int(monitored)}-{repeat}"
                runs[monitored].append(one_run(out, args.rounds, args.every, monitored))
                print(f"repeat {repeat + 1}, leakage {'on' if monitored else 'off'}: {runs[monitored][-1]}",
                      file=sys.stderr)

    def mean(monitored: bool, key: str) -> float:
        return statistics.mean(r[key] for r in runs[monitored])

    ratio = mean(True, "rounds_s") / mean(False, "rounds_s")
    command = (f".venv/bin/python benchmarks/leakage_overhead.py --rounds {args.rounds} --every {args.every} "
               f"--repeats {args.repeats}")
    lines = [
        "# Per-round leakage measurement: its share of a run's wall time",
        "",
        f"Command: `{command}`; the default experiment (MiniLM-L6, cut 1, nf4, 8-bit, runtime ray) at "
        f"{args.rounds} rounds, evaluated every {args.every}; leakage (the `privacy.monitor` attacks, default "
        f"the linear probe on `privacy.monitor_aux_samples` = 500 auxiliary sentences) at the same cadence. "
        f"Machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| leakage | runs | rounds' wall s (each) | command wall s (each) | final accuracy | final leakage |",
        "|---|---:|---|---|---:|---:|",
    ]
    for monitored in (False, True):
        rs = runs[monitored]
        lines.append(f"| {'every ' + str(args.every) + ' rounds' if monitored else 'off'} | {len(rs)} | "
                     + ", ".join(f"{r['rounds_s']:.1f}" for r in rs) + " | "
                     + ", ".join(f"{r['command_s']:.1f}" for r in rs) + f" | {rs[-1]['accuracy']:.4f} | "
                     + (f"{rs[-1]['leakage']:.3f}" if monitored else "-") + " |")
    lines += ["", f"Rounds' wall time with leakage / without: **{ratio:.3f}** (mean over the repeats); the whole "
              f"command: {mean(True, 'command_s') / mean(False, 'command_s'):.3f}.", ""]
    text = "\n".join(lines)
    write_text(ROOT / "benchmarks/results/leakage_overhead.md", text)  # atomically: never a half-written table
    print(text)


if __name__ == "__main__":
    main()
