"""The server-part group: W actors that run each local step on all devices' micro-batches
(docs/concepts/ray-runtime.md).

engine torch: one rank holding the reference runtime's ServerRunner. engine deepspeed: W ranks, each a
DeepSpeed engine (ZeRO stage 0-3) over the same server part, wired with explicit RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT (gloo on CPU, nccl on GPU). The step's batch is sharded over the ranks by
device; every rank runs every step (ZeRO-3 gathers parameters collectively). Rank r's loss is
(W / N) * (sum of its samples' losses), so DeepSpeed's gradient average equals the mean loss's gradient
over all N samples; its activation gradients are divided by W to match.

Rendezvous works across nodes: the ranks are built first, then rank 0 names its own node's address and a
port free there (as torchtune's and Ray Train's process groups do), and every rank joins the group at
that address. Under DeepSpeed the state a resume needs (trainable tensors, optimizer state, ZeRO
partitions) is DeepSpeed's own checkpoint of every rank, carried to the driver as file contents, so it
ends up in the run's one atomically written checkpoint file whichever node each rank ran on.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sflam.actors.failures import logged
from sflam.actors.memory import trimmed
from sflam.platform import codec
from sflam.platform.assembly import merge_server_copies, server_runner
from sflam.platform.build import quiet_libraries
from sflam.platform.codec import Encoded, EncodedList
from sflam.platform.config import config_from_dict
from sflam.platform.messages import DOWNLINK, Smashed, codec_generator, real_rows
from sflam.platform.server import SERVER_CHUNK_SAMPLES, ServerRunner
from sflam.platform.split import ServerPart
from sflam.platform.strategies import Adapter

StepStats = tuple[float, int, int, int]  # (summed loss, correct, samples, gradient bits) of a rank's shard


def shard_bounds(count: int, ranks: int, rank: int) -> tuple[int, int]:
    """Contiguous, as-even-as-possible share of `count` devices for `rank`."""
    edges = np.linspace(0, count, ranks + 1).round().astype(int)
    return int(edges[rank]), int(edges[rank + 1])


def deepspeed_config(zero_stage: int, offload_optimizer: bool, batch_size: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a server rank (fp32, no gradient clipping: the same maths as torch AdamW)."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer and zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_batch_size": batch_size * world_size,
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told: the torch engine does not clip
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
        "steps_per_print": 10**9,
    }


CHECKPOINT_TAG = "server"


def free_port(host: str) -> int:
    """A TCP port nobody listens on at `host` (this node's address), for the group's rendezvous."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerRank:
    """One rank of the server-part group."""

    def __init__(self, config: dict[str, Any], rank: int = 0, world_size: int = 1,
                 log_file: str = "server-rank.log") -> None:
        self.log_file = log_file
        self.config = config_from_dict(config)
        # a step runs while every edge worker waits for its gradients: by default a large one has the node's cores
        self.node_threads = max(1, len(os.sched_getaffinity(0)) // world_size)
        torch.set_num_threads(self.step_threads(0))
        quiet_libraries()
        self.rank, self.world_size = rank, world_size
        self.engine: Any = None
        # the torch engine on the GPU Ray reserved for it (Ray sets CUDA_VISIBLE_DEVICES to it)
        self.device = torch.device("cuda" if self.config.server.gpus_per_rank > 0 and torch.cuda.is_available()
                                   else "cpu")

    @logged
    @trimmed
    def load(self, part: ServerPart, send_gradients: bool) -> int:
        """`part` arrives built: the driver's server part through the object store (this rank's own copy)."""
        self.server = server_runner(self.config, part, send_gradients)
        if self.config.server.engine == "torch" and self.device.type == "cuda":
            self.server.part.to(self.device)
        return os.getpid()

    @logged
    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's node address and a port free on that node: where the group meets."""
        import ray

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    @logged
    @trimmed
    def join(self, master_addr: str, master_port: int) -> str:
        """Join the DeepSpeed group at rank 0's address (after `load`); returns the collectives backend in use."""
        self._init_deepspeed(master_addr, master_port)
        return str(self.backend)

    def _init_deepspeed(self, master_addr: str, master_port: int) -> None:
        os.environ.update({"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": "0",
                           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        import deepspeed

        srv = self.config.server
        self.backend = srv.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        deepspeed.init_distributed(dist_backend=self.backend, auto_mpi_discovery=False, rank=self.rank,
                                   world_size=self.world_size)
        part = self.server.part
        if torch.cuda.is_available() and self.backend == "nccl":
            part.cuda()
        params = [p for p in part.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.config.train.server_lr, weight_decay=0.0)
        ds_config = deepspeed_config(srv.zero_stage, srv.offload_optimizer, self.config.train.batch_size,
                                     self.world_size)
        self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(model=part, optimizer=optimizer,
                                                                    config=ds_config)
        self.client_optimizer = optimizer  # ZeRO wraps it; its param groups are the ones that step

    def ready(self) -> int:
        return os.getpid()

    def step_threads(self, samples: int) -> int:
        """Torch threads for a step of `samples` samples: server.threads, or by default one thread up to one
        chunk (SERVER_CHUNK_SAMPLES: on small steps waking threads costs more than it gains) and the node's
        CPUs shared by the ranks above it."""
        if self.config.server.threads:
            return self.config.server.threads
        return self.node_threads if samples > SERVER_CHUNK_SAMPLES else 1

    def set_lr_factor(self, factor: float) -> None:
        if self.engine is None:
            self.server.set_lr_factor(factor)
            return
        for optimizer in {id(o): o for o in (self.client_optimizer, self.ds_optimizer)}.values():
            for group in optimizer.param_groups:
                group["lr"] = self.config.train.server_lr * factor

    @logged
    @trimmed
    def step(self, round_index: int, step: int, lr_factor: float, *message_lists: list[Smashed]
             ) -> tuple[StepStats, list[Encoded | None]]:
        """Forward/backward of this rank's shard of the step's devices, one optimizer step, encoded gradients."""
        self.set_lr_factor(lr_factor)
        messages = [m for chunk in message_lists for m in chunk]
        threads = self.step_threads(sum(int(m.labels.shape[0]) for m in messages))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if self.engine is None and self.device.type == "cpu":  # the reference runtime's own code path
            result = self.server.step(messages, round_index, step)
            return ((result.loss * result.samples, result.correct, result.samples, sum(result.downlink_bits)),
                    EncodedList(result.gradients))  # one compact object to the edge workers
        start, stop = shard_bounds(len(messages), self.world_size, self.rank)
        return self._sharded_step(messages[start:stop], sum(int(m.labels.shape[0]) for m in messages),
                                  round_index, step)

    @property
    def model(self) -> torch.nn.Module:
        return self.engine if self.engine is not None else self.server.part

    def _sharded_step(self, shard: list[Smashed], total: int, round_index: int, step: int
                      ) -> tuple[StepStats, list[Encoded | None]]:
        """A DeepSpeed rank's step on its shard, or the torch engine's step on its GPU (one shard of all)."""
        starts = {self.server.part.start_of(m.cut) for m in shard}
        if starts - {0}:  # devices at their own cuts run on the CPU server rank (ServerRunner.step) only, for now
            raise ValueError("a DeepSpeed or GPU server rank runs every device from the server part's own cut; "
                             f"this shard has devices at cuts {sorted({m.cut for m in shard if m.cut is not None})}")
        hidden, mask, labels = ServerRunner.assemble(shard)
        device = next(self.model.parameters()).device
        hidden, mask, labels = hidden.to(device), mask.to(device), labels.to(device)
        hidden.requires_grad_(self.server.send_gradients)
        logits = self.model(hidden, mask)
        mean_loss, correct = self.server.part.loss_and_correct(logits, labels)
        shard_samples = int(labels.shape[0])
        loss = mean_loss * (shard_samples * self.world_size / total)
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        elif self.server.optimizer is not None or self.server.send_gradients:
            loss.backward()
            if self.server.optimizer is not None:
                self.server.optimizer.step()
                self.server.optimizer.zero_grad(set_to_none=True)
        gradients: list[Encoded | None] = [None] * len(shard)
        if self.server.send_gradients:  # every device's rows with its own stream, the shard's statistics at once
            mask = mask.cpu()
            grad_rows = real_rows(hidden.grad.cpu() / self.world_size, mask)  # type: ignore[union-attr]
            counts = [int(m.attention_mask.sum()) for m in shard]
            generators = [codec_generator(self.config.seed, round_index, step, m.device, DOWNLINK) for m in shard]
            gradients = list(codec.encode_many(grad_rows, counts, [self.server.gradient_bits] * len(shard),
                                               generators, self.server.side_dtype))
        bits = sum(g.payload_bits for g in gradients if g is not None)
        return (float(mean_loss.detach()) * shard_samples, int(correct), shard_samples, bits), EncodedList(gradients)

    @logged
    @trimmed
    def checkpoint(self) -> dict[str, Any]:
        """What an exact resume needs: the torch engine's tensors and optimizer state, or this rank's files of
        DeepSpeed's own checkpoint (trainable tensors, optimizer state and ZeRO partitions; every rank takes part)."""
        if self.engine is None:
            return {name: _to_cpu(value) for name, value in self.server.checkpoint().items()}
        with tempfile.TemporaryDirectory(prefix="sflam-ds-") as folder:
            self.engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, save_latest=False,
                                        exclude_frozen_parameters=True)  # the frozen base is rebuilt, not saved
            files = {str(path.relative_to(folder)): path.read_bytes()
                     for path in sorted(Path(folder).rglob("*.pt"))}  # not its copies of DeepSpeed's scripts
        return {"deepspeed": files}

    @logged
    @trimmed
    def restore(self, state: dict[str, Any]) -> None:
        if self.engine is None:
            self.server.restore(state)
            return
        if "deepspeed" not in state:
            raise ValueError("the checkpoint's server state is the torch engine's, this run uses deepspeed")
        with tempfile.TemporaryDirectory(prefix="sflam-ds-") as folder:
            for name, data in state["deepspeed"].items():  # every rank's files: each loads its own partition
                path = Path(folder) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            loaded, _ = self.engine.load_checkpoint(folder, tag=CHECKPOINT_TAG, load_module_strict=False,
                                                    load_lr_scheduler_states=False)
        if loaded is None:
            raise ValueError("DeepSpeed found no checkpoint of this group's ranks in the run's checkpoint")

    @logged
    @trimmed
    def merge_copies(self, pairs: list[tuple[str, str]], adapter: Adapter, cuts: list[int], weights: list[float]
                     ) -> Adapter:
        """Devices at several cuts: the blocks between the cuts merged with this rank's copies
        (`assembly.merge_server_copies`; the torch engine's one rank)."""
        return merge_server_copies(pairs, self.server.part, adapter, cuts, weights)

    @logged
    @trimmed
    def state(self) -> Adapter:
        """The server part's trained tensors (gathered from every rank under ZeRO-3)."""
        if self.engine is None or self.config.server.zero_stage < 3:
            return _to_cpu(self.server.state())
        import deepspeed

        params = [p for p in self.server.part.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone().cpu() for n, p in self.server.part.named_parameters() if p.requires_grad}


def _to_cpu(value: Any) -> Any:
    """Tensors (nested in dicts and lists) on the CPU, so a checkpoint from a GPU rank loads anywhere."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
