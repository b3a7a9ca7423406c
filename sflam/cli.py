"""`sflam <command>`: a table of command -> function; user errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sflam.platform.config import ExperimentConfig, load_config
from sflam.platform.errors import ConfigError, RunFailed, SflamError

if TYPE_CHECKING:
    from sflam.platform.results import RoundMetrics

EXIT_USAGE = 2
EXIT_FAILED = 1


def _load(args: argparse.Namespace) -> ExperimentConfig:
    config = load_config(args.config, list(args.overrides))
    if args.command != "validate":  # before any work: results a Ray job would lose, a cluster that is not there
        from sflam.cluster.guard import check_before_work

        check_before_work(config)
    return config


def cmd_validate(args: argparse.Namespace) -> int:
    from sflam.platform.build import quiet_libraries, validate

    quiet_libraries()
    config = _load(args)
    spec = validate(config)
    print(f"{args.config or '(defaults)'}: valid — {spec.name} ({spec.family}, {spec.num_layers} layers), "
          f"cut layer {config.split.cut_layer}, {config.data.num_devices} devices, "
          f"{config.train.devices_per_round} per round, runtime {config.runtime}")
    return 0


def _announce(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def print_progress(metrics: RoundMetrics, total: int) -> None:
    """One line per round on stderr (the closing table goes to stdout)."""
    from sflam.platform.results import round_line

    print(round_line(metrics, total), file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from sflam.pipelines.train import train
    from sflam.platform.build import quiet_libraries, validate
    from sflam.platform.results import format_table

    quiet_libraries()
    config = _load(args)
    validate(config)  # every config error surfaces before any model loads
    _announce(f"sflam run: {config.name} — {config.model.name}, cut layer {config.split.cut_layer}, "
              f"{config.quant.weights} device weights, {config.quant.activation_bits}-bit activations, "
              f"{config.quant.gradient_bits}-bit gradients, LoRA r={config.lora.rank}, "
              f"{config.data.num_devices} devices, {config.train.devices_per_round} per round, "
              f"{config.train.rounds} rounds, runtime {config.runtime}, allocation {config.allocation.policy}")

    def progress(metrics: RoundMetrics) -> None:
        print_progress(metrics, config.train.rounds)

    out_dir = Path(config.output_dir) / config.name
    if args.seeds > 1:
        return _run_seeds(config, args, progress)
    try:
        result = train(config, progress=progress, announce=_announce, resume=args.resume)
    except RunFailed as failure:
        kept = len(failure.partial.rounds) if failure.partial is not None else 0  # type: ignore[attr-defined]
        print(f"sflam run: error: {failure}; the {kept} completed round(s) and the checkpoint are in {out_dir} "
              f"(continue with --resume)", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        result.write_json(args.json)
    print(format_table(result))
    print(f"outputs in {out_dir}; MLflow run {result.mlflow_run_id or '-'}", file=sys.stderr)
    return 0


def _run_seeds(config: ExperimentConfig, args: argparse.Namespace, progress: Callable[..., None]) -> int:
    """`sflam run --seeds N`: the run repeated over N seeds, each its own MLflow run; means and 95 % intervals."""
    from sflam.pipelines.seeds import aggregate, seed_configs, with_ci
    from sflam.pipelines.train import train
    from sflam.platform.checkpoint import checkpoint_path

    summaries = []
    for seeded in seed_configs(config, args.seeds):
        _announce(f"== seed {seeded.seed}")
        resume = args.resume and checkpoint_path(Path(seeded.output_dir) / seeded.name).is_file()
        result = train(seeded, progress=progress, announce=_announce, resume=resume)
        summaries.append({"seed": seeded.seed, **result.summary()})
    summary = aggregate(summaries)
    if args.json:
        _write_json(args.json, {**summary, "runs": summaries})
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if key.endswith("_ci95"):
            continue
        text = with_ci(summary, key, ".6g") if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {text}")
    return 0


def cmd_tradeoff(args: argparse.Namespace) -> int:
    from sflam.pipelines.tradeoff import format_front, run_tradeoff
    from sflam.platform.build import quiet_libraries, validate

    quiet_libraries()
    config = _load(args)
    validate(config)
    print(f"sflam tradeoff: {config.name} — sweeping lambda over [0, 1] for one round of "
          f"{config.train.devices_per_round} devices", file=sys.stderr, flush=True)
    result = run_tradeoff(config)
    if args.json:
        _write_json(args.json, result.as_json())
    print(format_front(result))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from sflam.pipelines.compare import format_rows, run_compare
    from sflam.platform.build import quiet_libraries, validate

    quiet_libraries()
    config = _load(args)
    validate(config)
    _announce(f"sflam compare: {config.name} — fl, sl, sfl, sfl-v2, sfl-q and sflam on the same devices and data"
              + (", each at its own learning rates tuned on validation data" if args.tune else ""))
    result = run_compare(config, progress=lambda method, m: print_progress(m, config.train.rounds),
                         announce=_announce, seeds=args.seeds, resume=args.resume, tune=args.tune)
    if args.json:
        _write_json(args.json, result.rows)
    print("\n".join(format_rows(result.rows)))
    _announce(f"table in {result.table_path}; MLflow parent run {result.parent_run_id or '-'}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from sflam.pipelines.scale import DEFAULT_SIZES, format_scale, run_scale
    from sflam.platform.build import quiet_libraries, validate

    quiet_libraries()
    config = _load(args)
    validate(config)
    sizes = tuple(args.sizes or DEFAULT_SIZES)
    if any(k < 1 for k in sizes):
        raise ConfigError("--sizes", list(sizes), "positive numbers of devices per round")
    _announce(f"sflam scale: {config.name} at {', '.join(map(str, sizes))} devices per round")
    result = run_scale(config, sizes, progress=lambda k, m: print_progress(m, config.train.rounds),
                       announce=_announce, resume=args.resume)
    if args.json:
        _write_json(args.json, result.rows)
    print("\n".join(format_scale(result.rows)))
    _announce(f"table in {result.table_path}, plot {result.plot_path}; MLflow parent run {result.parent_run_id}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from sflam.pipelines.attack import run_attack
    from sflam.platform.build import quiet_libraries, validate
    from sflam.privacy.report import LABELS, format_table

    quiet_libraries()
    config = _load(args)
    validate(config)
    _announce(f"sflam attack: {config.name} — {config.model.name}, cut layer {config.split.cut_layer}, "
              f"{config.quant.weights} device weights, {config.quant.activation_bits}-bit smashed data; "
              f"an honest-but-curious server with the device weights and auxiliary data. {LABELS}")
    report = run_attack(config, announce=_announce)
    if args.json:
        _write_json(args.json, report.as_json())
    print("\n".join(format_table(report)))
    if report.guarantee is not None:
        print(f"(epsilon, delta) = ({report.guarantee.epsilon:.4g}, {report.guarantee.delta:g}) over "
              f"{report.guarantee.releases} releases of a sample")
    _announce(f"report in {', '.join(report.files)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from sflam.platform.tracking import clean_runs

    config = _load(args)
    if not args.clean:
        raise ConfigError("runs", "(no action)", "--clean: mark FAILED the RUNNING runs whose process has ended")
    uri, cleaned = clean_runs(config)
    for run_id in cleaned:
        print(run_id)
    _announce(f"{len(cleaned)} run(s) left RUNNING by a process that ended are now FAILED in {uri}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from sflam.platform.build import quiet_libraries, validate
    from sflam.search.study import run_study

    quiet_libraries()
    config = _load(args)
    validate(config)
    result = run_study(config, resume=args.resume, announce=_announce)
    if args.json:
        _write_json(args.json, result.front)
    print(result.table_path.with_suffix(".md").read_text().rstrip())
    _announce(f"study {result.study_name}: {result.trials} trials in {result.storage}; Pareto front in "
              f"{result.table_path}; plots {', '.join(str(p) for p in result.plots) or '-'}; MLflow parent run "
              f"{result.parent_run_id}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from sflam.cluster.submit import submit

    command = list(args.job)
    if command and command[0] == "--":
        command = command[1:]
    return submit(command, address=args.address, working_dir=Path(args.working_dir).resolve(), pip=args.pip,
                  num_cpus=args.num_cpus, num_gpus=args.num_gpus, follow=not args.no_wait,
                  tracking_uri=args.tracking_uri)


def cmd_server(args: argparse.Namespace) -> int:
    from sflam.cluster import tracking_server

    results = Path(args.dir)
    if args.action == "stop":
        stopped = tracking_server.stop(results)
        _announce(f"sflam server: stopped the MLflow server at {stopped.uri} (pid {stopped.pid})" if stopped
                  else f"sflam server: no MLflow server running for {results}")
        return 0
    if args.action == "status":
        server = tracking_server.running(results)
        if server is None:
            _announce(f"sflam server: no MLflow server running for {results}")
            return 1
    else:
        server, new = tracking_server.start(results, host=args.host, port=args.port, backend=args.backend_store,
                                            auth=args.auth)
        _announce(f"sflam server: {'started' if new else 'already running:'} MLflow tracking server (pid "
                  f"{server.pid}) over {server.backend_store_uri}, artifacts in {server.artifacts_destination}")
    print(f"MLFLOW_TRACKING_URI={server.uri}", flush=True)
    if server.auth:
        print(f"MLFLOW_TRACKING_USERNAME={tracking_server.ADMIN}", flush=True)
        _announce(f"basic-auth: the admin's password is in {tracking_server.auth_config_path(results)} (mode 0600); "
                  "export MLFLOW_TRACKING_PASSWORD from it for `sflam submit` and runs")
    _announce(f"MLflow UI: {server.uri} — stop the server with `sflam server stop`")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from sflam.cluster import database

    results = Path(args.dir)
    if args.action == "stop":
        stopped = database.stop(results)
        _announce(f"sflam db: stopped PostgreSQL on {stopped.host}:{stopped.port} (pid {stopped.pid})" if stopped
                  else f"sflam db: no PostgreSQL server running for {results}")
        return 0
    if args.action == "status":
        server = database.running(results)
        if server is None:
            _announce(f"sflam db: no PostgreSQL server running for {results}")
            return 1
    else:
        server, new = database.start(results, host=args.host, port=args.port)
        _announce(f"sflam db: {'started' if new else 'already running:'} PostgreSQL {server.version} (pid "
                  f"{server.pid}) on {server.host}:{server.port}, data in {server.folder}, SCRAM password in "
                  f"{server.password_file} (mode 0600)")
    print(server.url("optuna"), flush=True)
    _announce(f"study.storage: the URL above (the default for study.parallel > 1 on several nodes); MLflow: "
              f"`sflam server start --dir {results} --backend-store db` ({server.url('mlflow').split('?')[0]}); "
              "stop it with `sflam db stop`")
    return 0


def _write_json(path: str, payload: object) -> None:
    import json

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(target)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "attack": (cmd_attack, "attack the smashed data of a run's device part: leakage table, privacy.json/.md"),
    "run": (cmd_run, "train one experiment and print its round table"),
    "runs": (cmd_runs, "manage recorded runs: --clean marks FAILED the runs left RUNNING by a dead process"),
    "db": (cmd_db, "start, stop or show the project's PostgreSQL server on 127.0.0.1 (studies, MLflow)"),
    "compare": (cmd_compare, "run fl, sl, sfl, sfl-v2, sfl-q and sflam on the same scenario and compare them"),
    "scale": (cmd_scale, "the same experiment at 10, 100 and 1,000 devices per round"),
    "server": (cmd_server, "start, stop or show the MLflow tracking server on 127.0.0.1 over results/"),
    "study": (cmd_study, "explore the design space with Optuna (multi-objective by default)"),
    "submit": (cmd_submit, "run a sflam command as a Ray job: sflam submit [--address URL] -- run -c CONFIG"),
    "tradeoff": (cmd_tradeoff, "sweep lambda for one round: the latency-energy Pareto front (CSV, PNG)"),
    "validate": (cmd_validate, "check a config file (and overrides) without running anything"),
}


def _seeds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--seeds={text!r}: allowed is an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sflam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if name == "submit":
            command.add_argument("--address", default=None,
                                 help="Ray job server, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS or that)")
            command.add_argument("--working-dir", default=".", help="folder shipped with the job (default: .)")
            command.add_argument("--pip", action="store_true", help="install the project's requirements in the job")
            command.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the entrypoint")
            command.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the entrypoint")
            command.add_argument("--no-wait", action="store_true", help="print the job id and return")
            command.add_argument("--tracking-uri", default=None,
                                 help="MLflow tracking server for the job (default: MLFLOW_TRACKING_URI, else for a "
                                      "head on this machine the `sflam server` over ./results, started if needed)")
            command.add_argument("job", nargs=argparse.REMAINDER, help="-- then the sflam command to run")
            continue
        if name in ("server", "db"):
            command.add_argument("action", nargs="?", choices=("start", "stop", "status"), default="start",
                                 help="start (default), stop or show the server")
            command.add_argument("--dir", default="results", help="results folder it serves (default: results)")
            command.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
            command.add_argument("--port", type=int, default=5000 if name == "server" else 5432,
                                 help=f"port (default: {5000 if name == 'server' else 5432})")
            if name == "server":
                command.add_argument("--backend-store", default=None,
                                     help="where runs are kept: db (the `sflam db` server of --dir), a "
                                          "postgresql://... URL, or any SQLAlchemy URL (default: sqlite under --dir)")
                command.add_argument("--auth", action="store_true",
                                     help="MLflow's basic-auth app with generated admin credentials (required "
                                          "with a --host beyond 127.0.0.1)")
            continue
        if name == "validate":
            command.add_argument("config", nargs="?", default=None, help="YAML experiment file")
        else:
            command.add_argument("-c", "--config", default=None, help="YAML experiment file (default: built-in)")
            command.add_argument("--json", default=None, help="write the summary JSON here")
        if name in ("run", "compare"):
            command.add_argument("--seeds", type=_seeds, default=1,
                                 help="repeat over N seeds (seed, seed+1, ...) and report means with 95%% intervals")
        if name == "compare":
            command.add_argument("--tune", action="store_true",
                                 help="first tune each method's learning rates with Optuna on validation data "
                                      "carved from the training split (settings: the tune section), then run the "
                                      "seeds at them")
        if name == "study":
            command.add_argument("--resume", action="store_true", help="add trials to an existing study")
        if name in ("run", "scale", "compare"):
            command.add_argument("--resume", action="store_true",
                                 help="continue an interrupted run from its last completed round (same MLflow run)")
        if name == "runs":
            command.add_argument("--clean", action="store_true",
                                 help="mark FAILED every RUNNING run of this host whose process has ended")
        if name == "scale":
            command.add_argument("--sizes", type=int, nargs="+", default=None,
                                 help="devices per round to run (default: 10 100 1000)")
        command.add_argument("overrides", nargs="*", metavar="key=value",
                             help="dotted overrides, e.g. split.cut_layer=2")
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with options and `key=value` overrides in any order (`--json out.json a=1 -c x.yaml b=2`):
    argparse takes the first run of overrides, the others come back unrecognised and join them in order."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [token for token in rest if "=" in token and not token.startswith("-")]
    unknown = [token for token in rest if token not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    handler, _ = COMMANDS[args.command]
    try:
        return handler(args)
    except RunFailed as exc:  # the run could not go on: a failure, not a usage error
        print(f"sflam {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except SflamError as exc:
        print(f"sflam {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"sflam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover - `python -m sflam.cli` only; use `python -m sflam`
    sys.exit(main())
