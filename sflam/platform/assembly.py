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
from sflam.platform.errors import ConfigError
from sflam.platform.flops import FlopTable
from sflam.platform.memory import DeviceMemory, cached_device_memory
from sflam.platform.messages import FEATURES_DOWN, UPLINK, codec_generator
from sflam.platform.participation import round_indices, round_shapes, select_devices
from sflam.platform.planner import RoundPlanner
from sflam.platform.server import ServerRunner
from sflam.platform.split import DevicePart, HeadPart, ServerPart, block_of
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
        """Test accuracy and loss of the deployed pipeline: device part, activation codec, server part. Devices at
        several cuts: the test set through the pipeline at each cut the fleet runs (`deployed_cuts`), the figures
        weighted by the devices at each."""
        if not self.config.split.mixed:
            return summed([evaluate_batch(self.config, self.device, self.server.part, adapter, number, batch)
                           for number, batch in evaluation_batches(self.config, self.data)])
        shares = deployed_cuts(self.planner)
        return weighted_by_cut({cut: summed([evaluate_batch(self.config, self.device, self.server.part, adapter,
                                                            number, batch, cut)
                                             for number, batch in evaluation_batches(self.config, self.data)])
                                for cut in shares}, shares)


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
    if config.split.mixed:
        plan_cuts(config, data, device, server, planner)
    if config.allocation.deadline_s is not None:  # a deadline no allocation can meet fails before any training
        selected = select_devices(config.seed, 0, config.data.num_devices, config.train.devices_per_round)
        planner.plan(0, selected, round_shapes(data, round_indices(config, data, 0, selected)))
    longest = longest_batch(config, data)
    memory = cached_device_memory(config, device.part, adapter, longest, fields, device.head)
    planner.memory_by_rank = {r: (memory if r == config.lora.rank else cached_device_memory(
        config, device.part, truncated(adapter, r), longest, fields, device.head)).total for r in ranks}
    return planner, memory


@torch.no_grad()
def merge_server_copies(pairs: list[tuple[str, str]], server_part: ServerPart, adapter: Adapter, cuts: list[int],
                        weights: list[float]) -> Adapter:
    """Devices at several cuts: the blocks between the shallowest and the deepest cut have a device copy (trained
    by the devices cut below them, averaged over those) and a server copy (trained by the server on the samples of
    the devices cut at or above them). The new global copy of such a block is the two averaged, weighted by the
    finished devices each stands for; it replaces both (the server part's tensors are set in place), so every layer
    has one global copy and each device downloads the blocks below its cut
    (docs/concepts/split-and-codec.md#devices-at-different-cuts). `pairs`: `split.overlap_names` of the parts;
    returns the merged tensors under the device part's names (`adapter` holds at least those)."""
    out = {}
    server = dict(server_part.named_parameters())
    for device_name, server_name in pairs:
        block = block_of(device_name)
        assert block is not None
        on_devices = sum(w for w, c in zip(weights, cuts, strict=True) if w > 0 and c > block)
        on_server = sum(w for w, c in zip(weights, cuts, strict=True) if w > 0 and c <= block)
        if on_devices + on_server <= 0:
            out[device_name] = adapter[device_name]
            continue
        copy = server[server_name]
        merged = ((on_devices * adapter[device_name].double() + on_server * copy.detach().double())
                  / (on_devices + on_server))
        copy.copy_(merged.to(copy.dtype))
        out[device_name] = merged.to(adapter[device_name].dtype).cpu()
    return out


def weighted_by_cut(figures: dict[int, tuple[float, float]], shares: dict[int, int]) -> tuple[float, float]:
    """Accuracy and loss over the deployed cuts, each cut's weighted by the devices at it (`deployed_cuts`)."""
    total = sum(shares.values())
    return (sum(shares[c] * figures[c][0] for c in shares) / total,
            sum(shares[c] * figures[c][1] for c in shares) / total)


def deployed_cuts(planner: RoundPlanner) -> dict[int, int]:
    """The cuts the fleet runs and how many devices sit at each: under split.policy=memory every device of the
    population at its class's cut; under joint the latest round's devices at the cuts it gave them."""
    if planner.config.split.policy == "memory":
        names = planner.population.class_names(np.arange(planner.config.data.num_devices))
        at = [planner.class_cuts[name] for name in names]
    else:
        at = list(planner.last_cuts) or [max(planner.config.split.cuts)]
    return {int(c): at.count(c) for c in sorted(set(at))}


def plan_cuts(config: ExperimentConfig, data: DataBundle, device: DeviceRunner, server: ServerRunner,
              planner: RoundPlanner) -> None:
    """Devices at several cuts: each candidate cut's FLOP table, measured device-part peak and adapter payload on
    the planner, and under split.policy=memory each class's cut (the deepest its budget holds). A class that no
    candidate cut fits fails here, naming the smallest budget that would."""
    adapter = device.initial_adapter()
    longest = longest_batch(config, data)
    hidden = int(device.part.config.hidden_size)
    ranks: list[int | None] = [*class_ranks(config)] or [None]
    for cut in config.split.cuts:
        bottom, top = device.part.at(cut), server.part.at(cut)
        own = {n for n, _ in bottom.named_parameters()}
        held = {n: t for n, t in adapter.items() if n in own}
        fields = {**cost_fields(config, bottom, top), "cut_layer": cut}
        planner.flops_by_cut[cut] = FlopTable(bottom, top, held, hidden, cache=CostCache("flops", fields))
        planner.memory_by_cut[cut] = cached_device_memory(config, bottom, held, longest, fields).total
        for rank in ranks:
            payload = held if rank is None else truncated(held, rank)
            planner.adapter_bits_by_cut[(cut, rank)] = 32 * sum(t.numel() for t in payload.values())
    planner.flops = planner.flops_by_cut[max(config.split.cuts)]
    cuts = sorted(config.split.cuts)
    for c in config.devices.classes:
        fitting = [cut for cut in cuts if planner.memory_by_cut[cut] <= c.memory_mib * 2**20]
        if not fitting:
            need = planner.memory_by_cut[cuts[0]] / 2**20
            raise ConfigError(f"devices.classes[{c.name}].memory_mib", c.memory_mib,
                              f"at least {need:.1f} MiB (the measured device-part peak at the shallowest candidate "
                              f"cut {cuts[0]}), or a shallower cut in split.candidates")
        if config.split.policy == "memory":
            planner.class_cuts[c.name] = fitting[-1]


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
                   number: int, batch: Batch, cut: int | None = None) -> tuple[float, int, int]:
    """One evaluation batch through the deployed pipeline (device part, activation codec, server part): summed
    loss, correct predictions, samples. Every runtime and method evaluates a batch with this function. `cut`: the
    pipeline of a device at that cut (None: the parts' own)."""
    generator = codec_generator(config.seed, 0, number, EVAL_DEVICE, UPLINK)
    message = device.infer(adapter, batch, generator, cut)
    with torch.no_grad():
        hidden, mask, labels = ServerRunner.assemble([message])
        if device.head is None:
            logits = server_part(hidden, mask, server_part.start_of(cut))
            loss, correct = server_part.loss_and_correct(logits, labels)
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
