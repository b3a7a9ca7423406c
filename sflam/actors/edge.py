"""Edge worker: a Ray actor that loads the model and its quantized device part once and serves many
virtual devices. A device is data (an id, its shard, its adapter and optimizer for the round), so one
worker carries any number of them; the driver decides, the worker executes (DESIGN §8)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from sflam.platform.codec import Encoded
from sflam.platform.config import config_from_dict
from sflam.platform.executors import Adapter, DeviceState, Smashed, codec_generator, weighted_sum
from sflam.platform.runtime import EVAL_DEVICE, build_executors, device_round_batches


class EdgeWorker:
    """Runs the device part for a chunk of the round's selected devices, step by step."""

    def __init__(self, config: dict[str, Any], threads: int = 1) -> None:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        self.config = config_from_dict(config)
        self.data, self.device, _ = build_executors(self.config)
        self.states: list[DeviceState] = []
        self.batches: dict[int, list] = {}
        self.bits: dict[int, int] = {}
        self.round_index = -1

    def ready(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ a round
    def start(self, round_index: int, devices: list[int], bits: list[int], global_adapter: Adapter,
              lr_factor: float) -> None:
        """Every device of the chunk starts from the global adapter with a fresh optimizer."""
        self.round_index = round_index
        self.states = [self.device.start(k, global_adapter, lr_factor) for k in devices]
        self.batches = device_round_batches(self.config, self.data, round_index, np.asarray(devices))
        self.bits = dict(zip(devices, bits, strict=True))

    def forward(self, step: int) -> tuple[list[Smashed], int]:
        """The chunk's smashed data of a step, and its size in bits (a small second return the driver waits on,
        while the messages go to the server by reference)."""
        messages = [self.device.forward(state, self.batches[state.device][step], self.round_index, step,
                                        self.bits[state.device]) for state in self.states]
        return messages, sum(m.payload_bits for m in messages)

    def backward(self, step: int, offset: int, *gradient_shards: list[Encoded | None]) -> None:
        """Apply the server's gradients: the shards of all server ranks in device order, ours from `offset`."""
        gradients = [g for shard in gradient_shards for g in shard][offset:offset + len(self.states)]
        for state, gradient in zip(self.states, gradients, strict=True):
            self.device.backward(state, step, gradient)

    def finish(self) -> tuple[Adapter, float, int]:
        """The chunk's sample-weighted adapter sum, its total weight and the samples trained (for FedAvg)."""
        weights = [float(len(self.data.shards[state.device])) for state in self.states]
        adapters = [self.device.final_adapter(state) for state in self.states]
        total = float(sum(weights))
        partial = weighted_sum(adapters, weights)
        samples = sum(state.samples_trained for state in self.states)
        self.states = []
        return partial, total, samples

    def replay(self, round_index: int, devices: list[int], bits: list[int], global_adapter: Adapter,
               lr_factor: float, gradients: list[list[Encoded | None]]) -> None:
        """Rebuild a lost worker's devices: rerun the steps whose gradients the server already sent.

        Forward passes and codec draws are seeded by (round, step, device), so the states equal the lost ones.
        """
        self.start(round_index, devices, bits, global_adapter, lr_factor)
        for step, step_gradients in enumerate(gradients):
            self.forward(step)
            self.backward(step, 0, step_gradients)

    # ------------------------------------------------------------------ evaluation
    def infer(self, adapter: Adapter, numbers: list[int]) -> list[Smashed]:
        """Device-side inference of evaluation batches (numbered as in the reference runtime)."""
        from sflam.platform.runtime import evaluation_batches

        wanted = set(numbers)
        out = []
        for number, batch in evaluation_batches(self.config, self.data):
            if number in wanted:
                generator = codec_generator(self.config.seed, 0, number, EVAL_DEVICE, 0)
                out.append(self.device.infer(adapter, batch, generator))
        return out
