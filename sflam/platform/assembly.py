"""An experiment assembled from its config, once, for every runtime and pipeline: the data, the split model's two
parts and their runners, the FLOP table and device memory measured on them, the round planner; and the one
evaluation of the deployed pipeline (device part, activation codec, server part)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sflam.platform import codec
from sflam.platform.build import build_parts, prepare_data, quiet_libraries, validate
from sflam.platform.cache import CostCache, cost_fields
from sflam.platform.config import ExperimentConfig
from sflam.platform.data import Batch, DataBundle, collate
from sflam.platform.device import TOP, DeviceRunner
from sflam.platform.flops import FlopTable
from sflam.platform.memory import DeviceMemory, cached_device_memory
from sflam.platform.messages import FEATURES_DOWN, UPLINK, codec_generator
from sflam.platform.participation import round_indices, round_shapes, select_devices
from sflam.platform.planner import RoundPlanner
from sflam.platform.server import ServerRunner
from sflam.platform.split import DevicePart, HeadPart, ServerPart
from sflam.platform.strategies import Adapter, truncated

EVAL_DEVICE = -2  # the device id that seeds the evaluation's codec streams


@dataclass(kw_only=True)
class Experiment:
    """Everything a run needs, built once: config, data, the two parts' runners, the planner and the memory."""

    config: ExperimentConfig
    data: DataBundle
    device: DeviceRunner
    server: ServerRunner
    planner: RoundPlanner
    memory: DeviceMemory

    @classmethod
    def build(cls, config: ExperimentConfig, schedule: str = "lockstep") -> Experiment:
        data, device, server = build_runners(config)
        planner, memory = plan_costs(config, data, device, server, schedule)
        return cls(config=config, data=data, device=device, server=server, planner=planner, memory=memory)

    def evaluate(self, adapter: Adapter) -> tuple[float, float]:
        """Test accuracy and loss of the deployed pipeline: device part, activation codec, server part."""
        return summed([evaluate_batch(self.config, self.device, self.server.part, adapter, number, batch)
                       for number, batch in evaluation_batches(self.config, self.data)])


def build_runners(config: ExperimentConfig) -> tuple[DataBundle, DeviceRunner, ServerRunner]:
    """Data, and the device and server runners over the split model: the same in every process."""
    quiet_libraries()
    if config.threads:
        torch.set_num_threads(config.threads)
    spec = validate(config)
    data = prepare_data(config, spec)
    device_part, server_part = build_parts(config, spec, data)
    head = None
    if config.split.head == "device":  # a U-shaped split: the head trains on the devices, never on the server
        head = HeadPart(server_part)
        for param in head.parameters():
            param.requires_grad_(False)
    device = device_runner(config, device_part, head)
    return data, device, server_runner(config, server_part, send_gradients=device.trains)


def device_runner(config: ExperimentConfig, part: DevicePart, head: HeadPart | None = None) -> DeviceRunner:
    """The device runner over an already built device part (an edge worker gets the driver's part)."""
    q, p = config.quant, config.privacy
    return DeviceRunner(part, q.activation_bits, q.gradient_bits, q.side_dtype, config.train.device_lr, config.seed,
                        head, clip_norm=p.clip_norm, noise_sigma=p.noise_sigma, nopeek_weight=p.nopeek_weight)


def server_runner(config: ExperimentConfig, part: ServerPart, send_gradients: bool) -> ServerRunner:
    """The server runner over an already built server part."""
    return ServerRunner(part, config.quant.gradient_bits, codec.GRADIENT_SIDE_DTYPE, config.train.server_lr,
                        config.seed, send_gradients=send_gradients)


def plan_costs(config: ExperimentConfig, data: DataBundle, device: DeviceRunner, server: ServerRunner,
               schedule: str = "lockstep") -> tuple[RoundPlanner, DeviceMemory]:
    """The FLOP table and device memory, measured on the real parts (or read from the on-disk cache of earlier
    measurements of the same parts, `sflam.platform.cache`), and the round planner."""
    adapter = device.initial_adapter()
    hidden = int(device.part.config.hidden_size)
    fields = cost_fields(config, device.part, server.part)
    flops = FlopTable(device.part, server.part, {n: t for n, t in adapter.items() if not n.startswith(TOP)}, hidden,
                      cache=CostCache("flops", fields), head_part=device.head)
    adapter_bits = 32 * sum(t.numel() for t in adapter.values())
    width = device.head.width if device.head is not None else 0
    ranks = class_ranks(config)  # lora.rank_policy=by-class: each class's devices pay their own rank's adapter
    rank_bits = {r: 32 * sum(t.numel() for t in truncated(adapter, r).values()) for r in ranks}
    planner = RoundPlanner(config, flops, adapter_bits, trains_device=device.trains, schedule=schedule,
                           head_width=width, rank_bits=rank_bits)
    if config.allocation.deadline_s is not None:  # a deadline no allocation can meet fails before any training
        selected = select_devices(config.seed, 0, config.data.num_devices, config.train.devices_per_round)
        planner.plan(0, selected, round_shapes(data, round_indices(config, data, 0, selected)))
    longest = longest_batch(config, data)
    memory = cached_device_memory(config, device.part, adapter, longest, fields, device.head)
    planner.memory_by_rank = {r: (memory if r == config.lora.rank else cached_device_memory(
        config, device.part, truncated(adapter, r), longest, fields, device.head)).total for r in ranks}
    return planner, memory


def class_ranks(config: ExperimentConfig) -> list[int]:
    """The distinct LoRA ranks of the device classes under lora.rank_policy=by-class (empty under fixed)."""
    if config.lora.rank_policy != "by-class":
        return []
    return sorted({c.lora_rank or config.lora.rank for c in config.devices.classes})


def longest_batch(config: ExperimentConfig, data: DataBundle) -> Batch:
    """A full-length mini-batch of real training samples: the step that needs the most activation memory."""
    longest = np.argsort([-len(s) for s in data.train.input_ids])[: config.train.batch_size]
    return collate(data.train, longest, data.pad_token_id)


# --------------------------------------------------------------------------- evaluation


def evaluation_batches(config: ExperimentConfig, data: DataBundle) -> list[tuple[int, Batch]]:
    """The held-out set (the test split, or the validation samples: data.evaluate_on) in evaluation batches,
    numbered (the number seeds the codec of each batch)."""
    size = config.train.eval_batch_size
    indices = np.arange(len(data.test))
    return [(number, collate(data.test, indices[start:start + size], data.pad_token_id))
            for number, start in enumerate(range(0, len(indices), size))]


def evaluate_batch(config: ExperimentConfig, device: DeviceRunner, server_part: ServerPart, adapter: Adapter,
                   number: int, batch: Batch) -> tuple[float, int, int]:
    """One evaluation batch through the deployed pipeline (device part, activation codec, server part): summed
    loss, correct predictions, samples. Every runtime and method evaluates a batch with this function."""
    generator = codec_generator(config.seed, 0, number, EVAL_DEVICE, UPLINK)
    message = device.infer(adapter, batch, generator)
    with torch.no_grad():
        hidden, mask, labels = ServerRunner.assemble([message])
        if device.head is None:
            loss, correct = server_part.loss_and_correct(server_part(hidden, mask), labels)
        else:  # a U-shaped split: the server's features down through the codec, the head on the device
            features = codec.encode(server_part.features(hidden, mask), config.quant.activation_bits,
                                    codec_generator(config.seed, 0, number, EVAL_DEVICE, FEATURES_DOWN),
                                    codec.GRADIENT_SIDE_DTYPE)
            loss, correct = device.infer_head(adapter, features, batch)
    return float(loss) * len(batch), int(correct), len(batch)


def summed(results: list[tuple[float, int, int]]) -> tuple[float, float]:
    """Accuracy and mean loss from the evaluation batches' figures, added in batch order (so every runtime,
    however it spreads the batches, gets the same floating-point sums)."""
    total_loss, correct, total = 0.0, 0, 0
    for batch_loss, batch_correct, count in results:
        total_loss, correct, total = total_loss + batch_loss, correct + batch_correct, total + count
    return correct / total, total_loss / total
