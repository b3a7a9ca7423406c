"""Edge worker: a Ray actor that receives the built, quantized device part once and serves many
virtual devices. A device is data (an id, its shard, its adapter and optimizer for the round), so one
worker carries any number of them, all as one batched cohort per local step; the driver decides (devices,
batches, bits, dropouts, weights, instructions), the worker executes (docs/concepts/ray-runtime.md). A failure
inside a call
is written with its traceback to the worker's log file and raised as one line that names it."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from sflam.actors.failures import logged
from sflam.actors.memory import trimmed
from sflam.platform.assembly import device_runner, evaluate_batch, evaluation_batches
from sflam.platform.build import quiet_libraries
from sflam.platform.codec import Encoded
from sflam.platform.cohort import Cohort
from sflam.platform.config import config_from_dict
from sflam.platform.data import DataBundle, collate
from sflam.platform.messages import Messages, Smashed
from sflam.platform.quantization import kernel_path
from sflam.platform.split import DevicePart, ServerPart
from sflam.platform.strategies import Adapter, FitInstructions


class EdgeWorker:
    """Runs the device part for a chunk of the round's devices, step by step."""

    def __init__(self, config: dict[str, Any], threads: int = 1, log_file: str = "edge-worker.log") -> None:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        self.log_file = log_file
        self.config = config_from_dict(config)
        quiet_libraries()
        self.server_part: ServerPart | None = None
        self.cohort: Cohort | None = None
        self.devices: list[int] = []
        self.batches: dict[int, list] = {}
        self.bits: dict[int, int] = {}
        self.steps: list[int] = []
        self.weights: list[float] = []
        self.round_index = -1

    @logged
    @trimmed
    def load(self, data: DataBundle, device_part: DevicePart, server_part: list[Any]) -> int:
        """`data` and `device_part` arrive built (the driver's, through the object store: nothing is tokenized,
        loaded or quantized again here); `server_part` holds the reference to the driver's server part, fetched
        at the first evaluation only."""
        self.data, self.device = data, device_runner(self.config, device_part)
        self.server_part_ref = server_part
        if self.config.ray.gpus_per_worker > 0 and torch.cuda.is_available():
            # Ray reserved GPUs for this worker and set CUDA_VISIBLE_DEVICES to them: "cuda" is its own
            self.device.place(torch.device("cuda"))
        return os.getpid()

    def where(self) -> tuple[str, list[Any]]:
        """The device the device part computes on and the GPUs Ray assigned to this worker."""
        import ray

        return str(self.device.compute), list(ray.get_gpu_ids())

    def kernels(self) -> dict[str, str]:
        """The kernels this worker's device part runs on its node's CPU (`quantization.kernel_path`)."""
        return kernel_path(self.config.quant.weights)

    def ready(self) -> int:
        return os.getpid()

    def threads(self) -> int:
        return torch.get_num_threads()

    # ------------------------------------------------------------------ a round
    @logged
    @trimmed
    def start(self, round_index: int, devices: list[int], bits: list[int], steps: list[int], weights: list[float],
              indices: dict[int, list[np.ndarray]], global_adapter: Adapter, lr_factor: float,
              fit: FitInstructions, ranks: list[int] | None = None, cuts: list[int] | None = None) -> None:
        """Every device of the chunk starts from the global adapter with a fresh optimizer, on the driver's batches,
        at its own LoRA rank (`ranks`; None or empty: the global adapter's) and cut (`cuts`; None or empty: the
        device part's)."""
        self.round_index = round_index
        self.devices = list(devices)
        self.cohort = self.device.start(self.devices, global_adapter, lr_factor, fit, ranks, cuts)
        self.batches = {k: [collate(self.data.train, idx, self.data.pad_token_id) for idx in indices[k]]
                        for k in devices}
        self.bits = dict(zip(devices, bits, strict=True))
        self.steps, self.weights = list(steps), list(weights)

    def _live(self, step: int) -> list[int]:
        """Positions in the chunk of the devices still taking part at a step."""
        return [i for i, s in enumerate(self.steps) if s > step]

    @logged
    @trimmed
    def forward(self, step: int) -> tuple[list[Smashed], int]:
        """The live devices' smashed data of a step, one batched computation, and its size in bits (a small second
        return the driver waits on, while the messages go to the server by reference as one object)."""
        assert self.cohort is not None, "start the round first"
        live = self._live(step)
        devices = [self.devices[i] for i in live]
        messages = self.device.forward(self.cohort, live, [self.batches[k][step] for k in devices],
                                       self.round_index, step, [self.bits[k] for k in devices])
        return Messages(messages), sum(m.payload_bits for m in messages)  # one compact object to the server

    @logged
    @trimmed
    def backward(self, step: int, offset: int, *gradient_shards: list[Encoded | None]) -> None:
        """Apply the server's gradients: the shards of all server ranks in device order, ours from `offset`."""
        assert self.cohort is not None, "start the round first"
        count = len(self._live(step))
        gradients = [g for shard in gradient_shards for g in shard][offset:offset + count]
        if len(gradients) != count:
            raise ValueError(f"{len(gradients)} gradients for {count} live devices at local step {step + 1}")
        self.device.backward(self.cohort, step, gradients)

    @logged
    @trimmed
    def finish(self) -> tuple[Adapter, float, int, dict[str, float] | None]:
        """The chunk's weighted adapter sum over the devices that finished, its total weight, samples trained, and
        (devices at several cuts) each tensor's total weight over the devices that hold it."""
        assert self.cohort is not None, "start the round first"
        partial = self.cohort.weighted_sum(self.weights)
        samples = self.cohort.samples_trained
        per_tensor = self.cohort.tensor_weights(self.weights) if self.cohort.cuts else None
        self.cohort = None
        return partial, float(sum(w for w in self.weights if w > 0)), samples, per_tensor

    @logged
    @trimmed
    def replay(self, gradients: list[list[Encoded | None]], *start_args: Any) -> None:
        """Rebuild a lost worker's devices: rerun the steps whose gradients the server already sent.

        Forward passes and codec draws are seeded by (round, step, device), so the states equal the lost ones.
        """
        self.start(*start_args)
        for step, step_gradients in enumerate(gradients):
            self.forward(step)
            self.backward(step, 0, step_gradients)

    # ------------------------------------------------------------------ evaluation
    @logged
    @trimmed
    def evaluate(self, adapter: Adapter, server_state: Adapter, numbers: list[int], cut: int | None = None
                 ) -> list[tuple[float, int, int]]:
        """Evaluation batches `numbers` (as the reference runtime numbers them) through the whole deployed
        pipeline here: this worker's own test data, the device part, the codec and the server part with the
        server's current trained tensors (`cut`: the pipeline of a device at that cut). Only the batches' figures
        travel back."""
        if self.server_part is None:
            import ray

            self.server_part = ray.get(self.server_part_ref[0])
        part = self.server_part
        with torch.no_grad():
            for name, param in part.named_parameters():
                if param.requires_grad:
                    param.copy_(server_state[name])
        wanted = set(numbers)
        adapter = self.device.here(adapter)  # once for every batch (to an edge worker's GPU)
        return [evaluate_batch(self.config, self.device, part, adapter, number, batch, cut)
                for number, batch in evaluation_batches(self.config, self.data) if number in wanted]
