"""Mutation score of the modules that decide the reported numbers: mutmut per module, its results in a table.

Run: .venv/bin/python benchmarks/mutation.py [--targets codec schedule ...] [--workers 1] [--fresh | --survivors]
     [--sample N] [--seed S]
Each target mutates its module(s) with mutmut 3 (each mutant is one small change of the code: an operator, a
constant, a dropped argument) and runs, for each mutant, the tests of the target's fast selection that call the
mutated function; a mutant is killed when one of them fails. The work happens in `.mutation/<target>/` (a
scratch copy, git-ignored; `--fresh` starts it again). Mutants listed in benchmarks/mutation_equivalent.txt
(name, then the reason they cannot change a result) are left out of the score. Writes
benchmarks/results/mutation.md. Minutes to hours: not part of `make test` or CI.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutation"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.txt"
RESULTS = ROOT / "benchmarks" / "results" / "mutation.md"
MUTMUT = Path(sys.executable).with_name("mutmut")

# pytest's exit codes as mutmut records them (mutmut.stats.status_by_exit_code)
KILLED, SURVIVED, TIMEOUT = {1, 3}, {0}, {36, 24, -24, 152, 255}
NO_TESTS = {5, 33}


@dataclass(frozen=True)
class Target:
    """What one mutmut run mutates, and the tests that judge its mutants (the fast tests that cover it)."""

    modules: tuple[str, ...]
    tests: tuple[str, ...]
    # test only a seeded random sample of this many mutants per module (the score then estimates the whole's):
    # for modules whose covering tests take minutes per surviving mutant on this machine
    sample: int | None = None


MESSAGE = "changes only the wording of an error message (found by benchmarks/mutation.py, not listed)"
FAST = "not slow and not integration"
TARGETS: dict[str, Target] = {
    "codec": Target(("sflam/platform/codec.py",), ("tests/platform/test_codec.py",)),
    "schedule": Target(("sflam/platform/schedule.py",), (
        "tests/platform/test_schedule.py",
        "tests/platform/test_costs.py::test_lockstep_latency_of_a_hand_made_plan",
    )),
    "strategies": Target(("sflam/platform/strategies.py",), (
        "tests/platform/test_strategies.py",
        "tests/platform/test_runtime.py::test_fedavg_is_the_sample_weighted_mean",
        "tests/platform/test_engine.py",
    )),
    "split": Target(("sflam/platform/split.py",), (
        "tests/platform/test_split.py",
        "tests/platform/test_vision_split.py",
    )),
    "cohort": Target(("sflam/platform/cohort.py",), ("tests/platform/test_cohort.py",), sample=70),
    # the stage solver and the bits block share their tests; the slowest brute-force cases (a minute or more each)
    # are left to the suite, their smaller cases of the same tests stay
    "allocation": Target((
        "sflam/platform/allocation/stage.py",
        "sflam/platform/allocation/block.py",
        "sflam/platform/allocation/bits.py",
    ), (
        "tests/platform/test_allocation.py",
        "tests/platform/test_subchannels.py",
        "-k", "not exhaustive_search_equals_brute_force and not within_one_percent_of_brute_force",
    ), sample=70),
}


def equivalent_mutants() -> dict[str, str]:
    """benchmarks/mutation_equivalent.txt: `mutant-name  reason` per line, `#` comments."""
    found: dict[str, str] = {}
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, reason = line.partition(" ")
                found[name] = reason.strip()
    return found


def _functions(mutated: Path) -> dict[str, ast.FunctionDef]:
    """Every function of mutmut's mutated copy of a module (the original `..._mutmut_orig` and each mutant)."""
    tree = ast.parse(mutated.read_text())
    return {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            and "__mutmut_" in node.name}


def _message_only(original: ast.FunctionDef, mutant: ast.FunctionDef) -> bool:
    """The mutant changes only the text of the messages its `raise` statements carry (an error's wording)."""

    def without_messages(function: ast.FunctionDef) -> str:
        tree = ast.parse(ast.unparse(function))
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                        inner.value = ""
        tree.body[0].name = ""  # type: ignore[attr-defined]
        return ast.dump(tree)

    return ast.unparse(original) != ast.unparse(mutant).replace(mutant.name, original.name, 1) and (
        without_messages(original) == without_messages(mutant))


def mutant_sources(name: str, target: Target) -> dict[str, tuple[ast.FunctionDef, ast.FunctionDef]]:
    """Each mutant of the target's modules with the original function it changes."""
    found = {}
    for module in target.modules:
        mutated = WORK / name / "mutants" / module
        if not mutated.exists():
            continue
        dotted = module.removesuffix(".py").replace("/", ".")
        functions = _functions(mutated)
        for fname, node in functions.items():
            stem, _, number = fname.rpartition("__mutmut_")
            if number != "orig" and stem + "__mutmut_orig" in functions:
                found[f"{dotted}.{fname}"] = (functions[stem + "__mutmut_orig"], node)
    return found


def diff(original: ast.FunctionDef, mutant: ast.FunctionDef) -> str:
    a, b = ast.unparse(original).splitlines(), ast.unparse(mutant).splitlines()
    lines = difflib.unified_diff(a, b, lineterm="", n=1)
    return "\n".join(line for line in lines if not line.startswith(("---", "+++")))


def prepare(name: str, target: Target, fresh: bool) -> Path:
    """The scratch project mutmut works in: links to the package and tests, and a pyproject.toml with the target's
    [tool.mutmut] section after the repository's own (pytest's markers and options)."""
    work = WORK / name
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for linked in ("sflam", "tests", "configs"):
        if not (work / linked).exists():
            (work / linked).symlink_to(ROOT / linked)
    # a changed module must reach the mutated copy (mutmut copies the package once and keeps it)
    for module in target.modules:
        copied = work / "mutants" / module
        if copied.exists() and (ROOT / module).stat().st_mtime > copied.stat().st_mtime:
            shutil.rmtree(work / "mutants")
            break
    selection = json.dumps(list(target.tests))
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + f"""
[tool.mutmut]
source_paths = ["sflam"]
only_mutate = {json.dumps(list(target.modules))}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "{FAST}"]
pytest_add_cli_args_test_selection = {selection}
also_copy = ["configs"]
""")
    return work


def run(name: str, target: Target, workers: int, fresh: bool, survivors: bool) -> float:
    """mutmut over the target: every mutant without a result (all of them with --fresh), or, with `survivors`,
    again the mutants that survived the last run (after tests were added)."""
    names = []
    if survivors and not fresh:
        names = [key for codes in results(name, target).values() for key, code in codes.items()
                 if (code in SURVIVED or code in NO_TESTS) and (not target.sample or key in sampled(name, target))]
    work = prepare(name, target, fresh)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # mutmut puts the mutated package first; nothing else may shadow it
    started = time.perf_counter()
    if target.sample and not names:
        if not all(codes for codes in results(name, target).values()):
            # mutmut generates the mutants (and measures which tests cover what) before it filters by name: a
            # name that matches nothing stops it there
            subprocess.run([str(MUTMUT), "run", "--max-children", str(workers), "none.of.them"], cwd=work,
                           env=env, check=False)
        names = sorted(sampled(name, target))
    subprocess.run([str(MUTMUT), "run", "--max-children", str(workers), *names], cwd=work, env=env, check=True)
    wall = time.perf_counter() - started
    record = work / "wall.json"
    walls = json.loads(record.read_text()) if record.exists() else {}
    walls["survivors_seconds" if survivors and not fresh else "seconds"] = wall
    record.write_text(json.dumps(walls))
    return wall


def results(name: str, target: Target) -> dict[str, dict[str, int | None]]:
    """Each module's mutants with the exit code of their tests (mutmut's .meta files)."""
    found = {}
    for module in target.modules:
        meta = WORK / name / "mutants" / (module + ".meta")
        found[module] = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    return found


SEED = 0  # the sample's seed (--seed): another seed draws another sample, one that no test was written against


def sampled(name: str, target: Target) -> set[str]:
    """The target's seeded sample of mutants (the same names on every run of the same code and seed)."""
    chosen: set[str] = set()
    for codes in results(name, target).values():
        keys = sorted(codes)
        chosen |= set(random.Random(SEED).sample(keys, min(target.sample or len(keys), len(keys))))
    return chosen


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % for z = 1.96) of a proportion measured on a random sample of n."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def row(module: str, codes: dict[str, int | None], equivalent: dict[str, str], interval: bool = False
        ) -> tuple[str, list[str]]:
    counted = {key: code for key, code in codes.items() if key not in equivalent}
    killed = sum(code in KILLED for code in counted.values())
    timeouts = sum(code in TIMEOUT for code in counted.values())
    survived = [key for key, code in counted.items() if code in SURVIVED or code in NO_TESTS]
    other = len(counted) - killed - timeouts - len(survived)
    excluded = len(codes) - len(counted)
    score = (killed + timeouts) / len(counted) if counted else float("nan")
    shown = f"{100 * score:.1f} %"
    if interval:  # a sample's score estimates the module's: with its 95 % (Wilson) interval
        low, high = wilson(killed + timeouts, len(counted))
        shown += f" (95 % CI {100 * low:.0f}–{100 * high:.0f} %)"
    line = f"| `{module}` | {len(codes)} | {killed} | {len(survived)} | {timeouts} | {excluded} | {other} | {shown} |"
    return line, survived


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--workers", type=int, default=1, help="mutants tested at once (mutmut --max-children)")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results and test every mutant again")
    parser.add_argument("--survivors", action="store_true",
                        help="test again only the mutants that survived the last run (after adding tests)")
    parser.add_argument("--report-only", action="store_true", help="write the table from the last results")
    parser.add_argument("--sample", type=int, default=None,
                        help="mutants per module for the sampled targets (cohort, allocation) instead of their default")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled targets' samples")
    args = parser.parse_args()
    global SEED
    SEED = args.seed
    if args.sample is not None:
        for key, target in TARGETS.items():
            if target.sample:
                TARGETS[key] = Target(target.modules, target.tests, args.sample)

    if not args.report_only:
        for name in args.targets:
            run(name, TARGETS[name], args.workers, args.fresh, args.survivors)

    equivalent = equivalent_mutants()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
                            ).stdout.strip()
    sampling = (f" --sample {args.sample}" if args.sample is not None else "") + (
        f" --seed {args.seed}" if args.seed else "")
    lines = [
        f"Written at commit {commit} from each target's last results (the tests of that time) with mutmut "
        f"{mutmut_version()} by `.venv/bin/python benchmarks/mutation.py "
        f"--workers {args.workers}{sampling}` (one mutant at a time on a shared 2-core CPU machine). Score = (killed + "
        "timeouts) / (mutants - equivalent); a mutant that no selected test calls counts as survived.",
        "",
        "| module | mutants | killed | survived | timeouts | equivalent (excluded) | other | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    survivors: list[str] = []
    for name in TARGETS:
        if not (WORK / name / "mutants").exists():
            continue
        sources = mutant_sources(name, TARGETS[name])
        messages = {key: MESSAGE for key, (orig, mutant) in sources.items() if _message_only(orig, mutant)}
        left_here = []
        target = TARGETS[name]
        for module, codes in results(name, target).items():
            if target.sample:
                codes = {key: code for key, code in codes.items() if key in sampled(name, target)}
                module = f"{module} (random sample of {len(codes)}, seed {SEED})"
            line, left = row(module, codes, equivalent | messages, interval=bool(target.sample))
            lines.append(line)
            left_here += left
        # the survivors with their change, for review: a missing test, or an equivalent mutant to list
        (WORK / name / "survivors.txt").write_text("".join(
            f"{key}\n{diff(*sources[key]) if key in sources else '(source not found)'}\n\n" for key in left_here))
        survivors += left_here
    lines += ["", "| target | tests that judge its mutants | wall time (first run + its survivors after new tests) |",
              "|---|---|---:|"]
    for name, target in TARGETS.items():
        walls = json.loads((WORK / name / "wall.json").read_text()) if (WORK / name / "wall.json").exists() else {}
        wall = f"{walls['seconds'] / 60:.1f} min" if "seconds" in walls else "not run"
        if "survivors_seconds" in walls:
            wall += f" + {walls['survivors_seconds'] / 60:.1f} min"
        lines.append(f"| {name} | `{' '.join(target.tests)}` | {wall} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if survivors:
        print("\nsurvivors (not in benchmarks/mutation_equivalent.txt):\n  " + "\n  ".join(sorted(survivors)))


def mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


if __name__ == "__main__":
    main()
