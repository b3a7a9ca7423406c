"""Edge worker: a Ray actor that receives the built, quantized device part once and serves many
virtual devices. A device is data (an id, its shard, its adapter and optimizer for the round), so one
worker carries any number of them; the driver decides (devices, batches, bits, dropouts, weights,
instructions), the worker executes (DESIGN §8). A failure inside a call is written with its traceback
to the worker's log file and raised as one line that names it."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from sflam.actors.failures import logged
from sflam.platform.build import DataBundle, quiet_libraries
from sflam.platform.codec import Encoded
from sflam.platform.config import config_from_dict
from sflam.platform.data import collate
from sflam.platform.executors import Adapter, DeviceState, Smashed
from sflam.platform.runtime import device_executor, evaluate_batch, evaluation_batches
from sflam.platform.split import DevicePart, ServerPart
from sflam.platform.strategies import FitInstructions, weighted_sum


class EdgeWorker:
    """Runs the device part for a chunk of the round's devices, step by step."""

    def __init__(self, config: dict[str, Any], threads: int = 1, log_file: str = "edge-worker.log") -> None:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        self.log_file = log_file
        self.config = config_from_dict(config)
        quiet_libraries()
        self.server_part: ServerPart | None = None
        self.states: list[DeviceState] = []
        self.batches: dict[int, list] = {}
        self.bits: dict[int, int] = {}
        self.steps: list[int] = []
        self.weights: list[float] = []
        self.round_index = -1

    @logged
    def load(self, data: DataBundle, device_part: DevicePart, server_part: list[Any]) -> int:
        """`data` and `device_part` arrive built (the driver's, through the object store: nothing is tokenized,
        loaded or quantized again here); `server_part` holds the reference to the driver's server part, fetched
        at the first evaluation only."""
        self.data, self.device = data, device_executor(self.config, device_part)
        self.server_part_ref = server_part
        return os.getpid()

    def ready(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ a round
    @logged
    def start(self, round_index: int, devices: list[int], bits: list[int], steps: list[int], weights: list[float],
              indices: dict[int, list[np.ndarray]], global_adapter: Adapter, lr_factor: float,
              fit: FitInstructions) -> None:
        """Every device of the chunk starts from the global adapter with a fresh optimizer, on the driver's batches."""
        self.round_index = round_index
        self.states = [self.device.start(k, global_adapter, lr_factor, fit) for k in devices]
        self.batches = {k: [collate(self.data.train, idx, self.data.pad_token_id) for idx in indices[k]]
                        for k in devices}
        self.bits = dict(zip(devices, bits, strict=True))
        self.steps, self.weights = list(steps), list(weights)

    def _live(self, step: int) -> list[DeviceState]:
        return [state for state, s in zip(self.states, self.steps, strict=True) if s > step]

    @logged
    def forward(self, step: int) -> tuple[list[Smashed], int]:
        """The live devices' smashed data of a step, and its size in bits (a small second return the driver
        waits on, while the messages go to the server by reference)."""
        messages = [self.device.forward(state, self.batches[state.device][step], self.round_index, step,
                                        self.bits[state.device]) for state in self._live(step)]
        return messages, sum(m.payload_bits for m in messages)

    @logged
    def backward(self, step: int, offset: int, *gradient_shards: list[Encoded | None]) -> None:
        """Apply the server's gradients: the shards of all server ranks in device order, ours from `offset`."""
        live = self._live(step)
        gradients = [g for shard in gradient_shards for g in shard][offset:offset + len(live)]
        for state, gradient in zip(live, gradients, strict=True):
            self.device.backward(state, step, gradient)

    @logged
    def finish(self) -> tuple[Adapter, float, int]:
        """The chunk's weighted adapter sum over the devices that finished, its total weight, samples trained."""
        kept = [(state, w) for state, w in zip(self.states, self.weights, strict=True) if w > 0]
        partial = weighted_sum([self.device.final_adapter(s) for s, _ in kept], [w for _, w in kept])
        samples = sum(state.samples_trained for state in self.states)
        self.states = []
        return partial, float(sum(w for _, w in kept)), samples

    @logged
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
    def evaluate(self, adapter: Adapter, server_state: Adapter, numbers: list[int]) -> list[tuple[float, int, int]]:
        """Evaluation batches `numbers` (as the reference runtime numbers them) through the whole deployed
        pipeline here: this worker's own test data, the device part, the codec and the server part with the
        server's current trained tensors. Only the batches' figures travel back."""
        if self.server_part is None:
            import ray

            self.server_part = ray.get(self.server_part_ref[0])
        part = self.server_part
        with torch.no_grad():
            for name, param in part.named_parameters():
                if param.requires_grad:
                    param.copy_(server_state[name])
        wanted = set(numbers)
        return [evaluate_batch(self.config, self.device, part, adapter, number, batch)
                for number, batch in evaluation_batches(self.config, self.data) if number in wanted]
