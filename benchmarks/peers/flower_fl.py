"""Peer comparison: sflam's fl baseline against Flower's simulation engine on the same workload (issue 11).

The workload of the default scenario's fl baseline: MiniLM-L6 (the packaged model, loaded offline by sflam's
own loader), LoRA r=8 (alpha 16, query/key/value) with the classification head trained, fp32 weights,
Rotten Tomatoes over 1,000 clients with Dirichlet alpha=0.5, 20 clients per round, 2 local steps of batch 8
(the same seeded mini-batches on both sides), AdamW lr 3e-3, FedAvg weighted by samples. Evaluation is left
out of both timings. Flower runs in its own environment (flwr pins its own ray); sflam runs in the
project's, called as a subprocess by this script.

Run (after `make install` and `make peers`):
    benchmarks/peers/.venv/bin/python benchmarks/peers/flower_fl.py --rounds 4
It writes benchmarks/results/peers.md (atomically): seconds per round side by side, the first round (which
includes loading the model into the workers) apart from the steady rounds after it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # sflam's data and model code (pure transformers/numpy/pandas; no sflam install)

CLIENTS, PER_ROUND, STEPS, BATCH, LR, SEED = 1000, 20, 2, 8, 3.0e-3, 0
TARGETS = ["query", "key", "value"]


# --------------------------------------------------------------------------- the shared workload


class Workload:
    """MiniLM-L6 with LoRA, the tokenized training sentences and the Dirichlet shards, built once per process."""

    def __init__(self) -> None:
        import numpy as np
        import peft
        import torch

        from sflam.platform.config import DataConfig, ModelConfig
        from sflam.platform.data import dirichlet_partition, load_texts, tokenize, train_test_split
        from sflam.platform.models import load_model, load_tokenizer, resolve_model

        data_cfg = DataConfig(dataset="rotten_tomatoes", num_devices=CLIENTS, dirichlet_alpha=0.5)
        model_cfg = ModelConfig(name="minilm-l6", max_length=64)
        spec = resolve_model(model_cfg)
        tokenizer = load_tokenizer(spec, model_cfg)
        texts, labels = load_texts(data_cfg)
        data = tokenize(texts, labels, tokenizer, "classification", model_cfg.max_length)
        self.train, _ = train_test_split(data, data_cfg.test_fraction, data_cfg.split_seed)
        self.shards = dirichlet_partition(self.train.labels, CLIENTS, data_cfg.dirichlet_alpha, SEED)
        self.pad = int(tokenizer.pad_token_id)
        model = load_model(spec, model_cfg, int(np.max(labels)) + 1, self.pad, seed=SEED)
        torch.manual_seed(SEED + 1)
        peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS),
                                     model)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name or name.startswith("classifier"))
        self.model = model

    def trainable(self) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def local_training(self, state: dict, client: int, round_index: int) -> tuple[dict, int, float]:
        """A client's round: its 2 seeded mini-batches from the global adapter; the new adapter, samples, loss."""
        import torch

        from sflam.platform.data import collate, device_batches

        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    param.copy_(state[name])
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        samples, loss = 0, 0.0
        for idx in device_batches(self.shards[client], BATCH, STEPS, SEED, round_index, client):
            batch = collate(self.train, idx, self.pad)
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            samples, loss = samples + len(batch), float(out.loss.detach())
        return self.trainable(), samples, loss


def workload() -> Workload:
    """One model per worker process, as Flower's users cache it (Flower itself would rebuild it every call).

    Kept in sys.modules: the client app reaches Ray's actors by value (cloudpickle), so a global of this
    script would arrive empty with every copy, while sys.modules is the actor process's own."""
    holder = sys.modules.get("_peers_workload")
    if holder is None:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        holder = types.ModuleType("_peers_workload")
        holder.value = Workload()  # type: ignore[attr-defined]
        sys.modules["_peers_workload"] = holder
    return holder.value  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- Flower


def run_flower(rounds: int) -> dict:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        work = workload()
        state = msg.content["arrays"].to_torch_state_dict()
        round_index = int(msg.content["config"]["server-round"]) - 1
        new, samples, loss = work.local_training(state, int(context.node_config["partition-id"]), round_index)
        content = RecordDict({"arrays": ArrayRecord(new),
                              "metrics": MetricRecord({"num-examples": samples, "train_loss": loss})})
        return Message(content=content, reply_to=msg)

    marks: list[tuple[float, float]] = []

    class TimedFedAvg(FedAvg):
        """FedAvg that notes when each round's training starts and when its aggregate is ready."""

        def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
            marks.append((time.perf_counter(), float("nan")))
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            out = super().aggregate_train(server_round, replies)
            marks[-1] = (marks[-1][0], time.perf_counter())
            return out

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        import torch

        torch.manual_seed(SEED)
        initial = ArrayRecord(Workload().trainable())  # the server's copy, built in the server app's process
        strategy = TimedFedAvg(fraction_train=PER_ROUND / CLIENTS, fraction_evaluate=0.0, min_train_nodes=PER_ROUND,
                               min_available_nodes=CLIENTS)
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, train_config=ConfigRecord({"lr": LR}))

    started = time.perf_counter()
    cpus = os.cpu_count() or 1
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per client actor, as sflam's Ray workers
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False}})
    total = time.perf_counter() - started
    per_round = [end - start for start, end in marks]
    import flwr

    return {"runtime": f"Flower {flwr.__version__} simulation (Ray backend, {cpus} client actors)",
            "rounds_s": per_round, "total_s": total, "first_round_at_s": marks[0][0] - started if marks else None}


# --------------------------------------------------------------------------- sflam (project environment)


def run_sflam(rounds: int) -> dict:
    """`sflam run -c configs/default.yaml` as the fl baseline (pipelines/baselines.py), rounds timed by the engine."""
    started = time.perf_counter()
    from sflam.pipelines.baselines import method_config, run_fl
    from sflam.platform.config import load_config

    config = method_config(load_config(ROOT / "configs/default.yaml",
                                       [f"train.rounds={rounds}", "train.eval_every=1000", "data.eval_samples=8"]),
                           "fl")
    marks: list[float] = []
    result = run_fl(config, progress=lambda metrics: marks.append(time.perf_counter()))
    total = time.perf_counter() - started
    per_round = [r.wall_s for r in result.rounds]
    return {"runtime": "sflam fl baseline (reference runtime, one process)", "rounds_s": per_round, "total_s": total,
            "first_round_at_s": marks[0] - started - per_round[0]}


# --------------------------------------------------------------------------- the table


def table(rows: list[dict], rounds: int) -> str:
    lines = ["| runtime | first round (s) | later rounds, mean (s/round) | start to first round (s) | total (s) |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        later = row["rounds_s"][1:]
        mean = f"{statistics.mean(later):.2f}" if later else "-"
        lines.append(f"| {row['runtime']} | {row['rounds_s'][0]:.2f} | {mean} | {row['first_round_at_s']:.1f} | "
                     f"{row['total_s']:.1f} |")
    flower, sflam = rows[1]["rounds_s"][1:], rows[0]["rounds_s"][1:]
    ratio = statistics.mean(flower) / statistics.mean(sflam) if flower and sflam else float("nan")
    load = os.getloadavg()[0]
    return "\n".join([
        "# Peer comparison: fl baseline against Flower's simulation engine",
        "",
        f"Workload: MiniLM-L6, LoRA r=8 (query/key/value) + head, {CLIENTS} clients (Dirichlet alpha 0.5), "
        f"{PER_ROUND} per round, {STEPS} local steps of batch {BATCH}, {rounds} rounds, no evaluation.",
        f"Machine: {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
        f"load average {load:.1f} at the end of the run.",
        "",
        *lines,
        "",
        f"Flower's later rounds take {ratio:.2f}x sflam's.",
        "",
        "Command: `make peers && benchmarks/peers/.venv/bin/python benchmarks/peers/flower_fl.py "
        f"--rounds {rounds}`",
        "",
    ])


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.chmod(name, 0o644)
    os.replace(name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--side", choices=["both", "sflam", "flower"], default="both")
    parser.add_argument("--sflam-python", default=str(ROOT / ".venv/bin/python"))
    parser.add_argument("--json", type=Path, help="write this side's figures here (--side sflam|flower)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peers.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.side != "both":
        figures = run_sflam(args.rounds) if args.side == "sflam" else run_flower(args.rounds)
        text = json.dumps(figures)
        if args.json:
            write_atomic(args.json, text)
        print(text)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sflam.json"
        subprocess.run([args.sflam_python, __file__, "--side", "sflam", "--rounds", str(args.rounds), "--json",
                        str(out)], check=True, cwd=ROOT)
        sflam = json.loads(out.read_text())
    flower = run_flower(args.rounds)
    text = table([sflam, flower], args.rounds)
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
