"""Typed experiment configuration: YAML -> validated ExperimentConfig -> dotted overrides -> flat dict."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from sflam.platform.errors import ConfigError

WEIGHT_MODES = ("fp32", "bf16", "int8", "nf4", "fp4")
TASKS = ("classification", "causal-lm")
DATASETS = ("rotten_tomatoes", "synthetic", "csv", "mnist", "digits")
IMAGE_DATASETS = ("mnist", "digits")
RUNTIMES = ("local", "ray")
ENGINES = ("torch", "deepspeed")
SERVER_PLACEMENTS = ("pack", "spread")
EDGE_PLACEMENTS = ("spread", "default")
ALLOCATION_POLICIES = ("sflam", "equal")
BITS_SEARCHES = ("greedy", "exhaustive")
SIDE_DTYPES = ("fp32", "fp16")
ACCESS_MODES = ("fdma", "ofdma")
HEADS = ("server", "device")
EXHAUSTIVE_LIMIT = 4096  # bit combinations the exhaustive allocator may enumerate
AGGREGATION_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "ffa-lora")
AGGREGATION_WEIGHTS = ("trained", "shard")
EVALUATION_SETS = ("test", "validation")
TUNE_KNOBS = ("device_lr", "server_lr")
TUNE_SAMPLERS = ("tpe", "random")
RANK_POLICIES = ("fixed", "by-class")
SPLIT_POLICIES = ("fixed", "memory", "joint")


def _allowed_bits(value: int) -> bool:
    return value == 32 or 1 <= value <= 16


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _check_resources(key: str, resources: dict[str, float]) -> None:
    """Custom Ray resources: names Ray does not reserve itself, each a positive amount."""
    for name, amount in resources.items():
        _check(name not in ("CPU", "GPU", "memory", "object_store_memory"), f"{key}.{name}", amount,
               "a custom resource name (CPUs and GPUs have their own keys)")
        _check(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0, f"{key}.{name}",
               amount, "a number > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Which transformer to fine-tune and how its inputs are shaped."""

    SECTION: ClassVar[str] = "model"
    name: str = field(default="minilm-l6", metadata={"help": "packaged name, local folder or Hugging Face id"})
    task: str = field(default="classification", metadata={"help": "classification | causal-lm"})
    max_length: int = field(default=64, metadata={"help": "tokens per sentence after truncation"})
    allow_download: bool = field(default=False, metadata={"help": "let a hub id be fetched (off: offline)"})
    image_size: int = field(default=0, metadata={
        "help": "vision: input side in pixels, a multiple of the patch size (0: the model's own)"})

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", self.name, "a non-empty model name")
        _check(self.image_size >= 0, "model.image_size", self.image_size, "an integer >= 0 (0 = the model's own)")
        _check(self.task in TASKS, "model.task", self.task, f"one of {', '.join(TASKS)}")
        _check(self.max_length >= 4, "model.max_length", self.max_length, "an integer >= 4")


@dataclass(frozen=True)
class SplitConfig:
    """Where the model is cut between device part and server part."""

    SECTION: ClassVar[str] = "split"
    cut_layer: int = field(default=1, metadata={"help": "device part = embeddings + blocks [0, cut_layer)"})
    head: str = field(default="server", metadata={
        "help": "server: head and loss on the server (labels travel up) | device: a U-shaped split, the head and "
                "loss on the device (labels stay; the server sends its features down and gets their gradient)"})
    policy: str = field(default="fixed", metadata={
        "help": "fixed (every device at cut_layer) | memory (each class at the deepest candidate cut its memory "
                "budget holds) | joint (the allocator picks each device's cut with its bits, power and bandwidth; "
                "docs/concepts/split-and-codec.md#devices-at-different-cuts)"})
    candidates: list[int] = field(default_factory=list, metadata={
        "help": "the cuts a device may take under policy memory or joint, ascending (not used under fixed)"})

    def __post_init__(self) -> None:
        _check(self.cut_layer >= 0, "split.cut_layer", self.cut_layer, "an integer in 0..L (L = model layers)")
        _check(self.head in HEADS, "split.head", self.head, f"one of {', '.join(HEADS)}")
        _check(self.policy in SPLIT_POLICIES, "split.policy", self.policy, f"one of {', '.join(SPLIT_POLICIES)}")
        cuts = list(self.candidates)
        if self.policy != "fixed":  # (under fixed the candidates are not used: a config can switch policy by override)
            _check(len(cuts) >= 2 and all(isinstance(c, int) and c >= 0 for c in cuts) and cuts == sorted(set(cuts)),
                   "split.candidates", cuts, f"two or more distinct cuts in 0..L, ascending, with split.policy="
                   f"{self.policy}")

    @property
    def cuts(self) -> list[int]:
        """Every cut a device may take: the candidates, or [cut_layer] under the fixed policy."""
        return list(self.candidates) if self.policy != "fixed" else [self.cut_layer]

    @property
    def mixed(self) -> bool:
        """Whether devices may sit at different cuts (split.policy memory or joint)."""
        return self.policy != "fixed"


@dataclass(frozen=True)
class QuantConfig:
    """Quantization of the device part's frozen weights and of the smashed data."""

    SECTION: ClassVar[str] = "quant"
    weights: str = field(default="nf4", metadata={"help": "device-part base weights: fp32 bf16 int8 nf4 fp4"})
    activation_bits: int = field(default=8, metadata={"help": "uplink smashed-data bits: 1..16 or 32 (raw)"})
    gradient_bits: int = field(default=8, metadata={"help": "downlink activation-gradient bits: 1..16 or 32"})
    side_dtype: str = field(default="fp32", metadata={"help": "per-token scale/offset precision: fp32 fp16"})

    def __post_init__(self) -> None:
        _check(self.weights in WEIGHT_MODES, "quant.weights", self.weights, f"one of {', '.join(WEIGHT_MODES)}")
        for key in ("activation_bits", "gradient_bits"):
            value = getattr(self, key)
            _check(_allowed_bits(value), f"quant.{key}", value, "an integer in 1..16, or 32 for raw fp32")
        _check(self.side_dtype in SIDE_DTYPES, "quant.side_dtype", self.side_dtype, "fp32 or fp16")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the device part and the server part."""

    SECTION: ClassVar[str] = "lora"
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / rank)"})
    target_modules: list[str] = field(default_factory=list, metadata={"help": "empty: family default"})
    server: bool = field(default=True, metadata={"help": "LoRA on the server part's blocks too"})
    rank_policy: str = field(default="fixed", metadata={
        "help": "fixed (every device at lora.rank) | by-class (each device at its class's lora_rank <= lora.rank, "
                "adapters zero-padded to lora.rank for the average; docs/concepts/system-model.md#lora-ranks)"})

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "lora.rank", self.rank, "an integer >= 1")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "a number > 0")
        _check(self.rank_policy in RANK_POLICIES, "lora.rank_policy", self.rank_policy,
               f"one of {', '.join(RANK_POLICIES)}")


@dataclass(frozen=True)
class DataConfig:
    """The data set, its train/test split and its non-IID partition over devices."""

    SECTION: ClassVar[str] = "data"
    dataset: str = field(default="rotten_tomatoes", metadata={
        "help": "rotten_tomatoes | synthetic | csv (text); mnist | digits (images)"})
    path: str | None = field(default=None, metadata={"help": "data file (csv: columns text,label)"})
    test_fraction: float = field(default=0.1, metadata={"help": "held-out share, split with split_seed"})
    split_seed: int = field(default=1234, metadata={"help": "seed of the train/test split"})
    num_devices: int = field(default=1000, metadata={"help": "N devices holding the training data"})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "label skew: Dirichlet concentration"})
    eval_samples: int = field(default=0, metadata={
        "help": "cap on evaluated held-out samples (test or validation), 0 = all"})
    synthetic_samples: int = field(default=2000, metadata={"help": "size of the synthetic task"})
    evaluate_on: str = field(default="test", metadata={
        "help": "test: evaluate on the test split | validation: hold data.validation_fraction of the training split "
                "out of every device's shard and evaluate on it; the test split is then never built (tuning trials)"})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "share of the training split held out for validation with data.evaluate_on=validation (drawn with "
                "seed data.split_seed + 1)"})

    def __post_init__(self) -> None:
        _check(self.dataset in DATASETS, "data.dataset", self.dataset, f"one of {', '.join(DATASETS)}")
        _check(self.dataset != "csv" or self.path is not None, "data.path", self.path,
               "a CSV file with columns text,label when data.dataset=csv")
        _check(self.path is None or Path(self.path).is_file(), "data.path", self.path, "an existing data file")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", self.test_fraction, "a number in (0, 1)")
        _check(self.num_devices >= 1, "data.num_devices", self.num_devices, "an integer >= 1")
        _check(self.dirichlet_alpha > 0, "data.dirichlet_alpha", self.dirichlet_alpha, "a number > 0")
        _check(self.eval_samples >= 0, "data.eval_samples", self.eval_samples, "an integer >= 0 (0 = all)")
        _check(self.synthetic_samples >= 10, "data.synthetic_samples", self.synthetic_samples, "an integer >= 10")
        _check(self.evaluate_on in EVALUATION_SETS, "data.evaluate_on", self.evaluate_on,
               f"one of {', '.join(EVALUATION_SETS)}")
        _check(0.0 < self.validation_fraction < 1.0, "data.validation_fraction", self.validation_fraction,
               "a number in (0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Rounds of split federated training (docs/concepts/round-engine.md)."""

    SECTION: ClassVar[str] = "train"
    rounds: int = field(default=30, metadata={"help": "federated rounds"})
    devices_per_round: int = field(default=20, metadata={"help": "K devices sampled each round"})
    local_steps: int = field(default=2, metadata={"help": "E local steps per round"})
    batch_size: int = field(default=8, metadata={"help": "mini-batch per device per local step"})
    device_lr: float = field(default=1e-3, metadata={"help": "device adapters' AdamW learning rate"})
    server_lr: float = field(default=1e-3, metadata={"help": "server part's AdamW learning rate"})
    eval_every: int = field(default=5, metadata={"help": "evaluate every n rounds (and after the last)"})
    eval_batch_size: int = field(default=128, metadata={"help": "test samples per evaluation batch"})
    lr_schedule: str = field(default="cosine", metadata={"help": "constant | cosine (decay over rounds)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a share of the peak rate"})

    def lr_factor(self, round_index: int) -> float:
        """Learning-rate multiplier of a round (0-based): cosine from 1 to min_lr_ratio, or constant."""
        if self.lr_schedule == "constant" or self.rounds == 1:
            return 1.0
        progress = round_index / (self.rounds - 1)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def __post_init__(self) -> None:
        for key in ("rounds", "devices_per_round", "local_steps", "batch_size", "eval_every", "eval_batch_size"):
            value = getattr(self, key)
            _check(value >= 1, f"train.{key}", value, "an integer >= 1")
        for key in ("device_lr", "server_lr"):
            value = getattr(self, key)
            _check(value > 0, f"train.{key}", value, "a number > 0")
        _check(self.lr_schedule in ("constant", "cosine"), "train.lr_schedule", self.lr_schedule,
               "constant or cosine")
        _check(0 < self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "a number in (0, 1]")


@dataclass(frozen=True)
class SystemConfig:
    """The wireless uplink/downlink and the compute of devices and server (docs/concepts/system-model.md)."""

    SECTION: ClassVar[str] = "system"
    bandwidth_hz: float = field(default=20e6, metadata={"help": "total FDMA bandwidth B shared by a round's devices"})
    max_power_w: float = field(default=0.2, metadata={"help": "device transmit power cap P_max"})
    server_power_w: float = field(default=1.0, metadata={"help": "server downlink power P_s"})
    noise_dbm_per_hz: float = field(default=-174.0, metadata={"help": "noise power spectral density N0"})
    min_distance_m: float = field(default=50.0, metadata={"help": "devices are placed at U[min, max] metres"})
    max_distance_m: float = field(default=500.0, metadata={"help": "from the base station"})
    shadowing_db: float = field(default=0.0, metadata={"help": "log-normal shadowing std dev (0 = off)"})
    min_clock_hz: float = field(default=0.5e9, metadata={"help": "device clocks f_k ~ U[min, max]"})
    max_clock_hz: float = field(default=2.0e9, metadata={"help": "device clock upper bound"})
    flops_per_cycle: float = field(default=16.0, metadata={"help": "device FLOPs per cycle phi"})
    kappa: float = field(default=1e-28, metadata={"help": "effective switched capacitance (energy = kappa C f^2)"})
    server_flops: float = field(default=100e12, metadata={"help": "server throughput F_s in FLOP/s"})
    access: str = field(default="fdma", metadata={
        "help": "fdma (continuous bandwidth shares) | ofdma (whole subchannels of B/N, assigned by matching)"})
    subchannels: int = field(default=50, metadata={"help": "N equal subchannels of the band (ofdma)"})

    def __post_init__(self) -> None:
        for key in ("bandwidth_hz", "max_power_w", "server_power_w", "min_distance_m", "min_clock_hz",
                    "flops_per_cycle", "kappa", "server_flops"):
            value = getattr(self, key)
            _check(value > 0, f"system.{key}", value, "a number > 0")
        _check(self.max_distance_m >= self.min_distance_m, "system.max_distance_m", self.max_distance_m,
               f"a number >= system.min_distance_m={self.min_distance_m}")
        _check(self.max_clock_hz >= self.min_clock_hz, "system.max_clock_hz", self.max_clock_hz,
               f"a number >= system.min_clock_hz={self.min_clock_hz}")
        _check(self.shadowing_db >= 0, "system.shadowing_db", self.shadowing_db, "a number >= 0 (0 = off)")
        _check(self.access in ACCESS_MODES, "system.access", self.access, f"one of {', '.join(ACCESS_MODES)}")
        _check(self.subchannels >= 1, "system.subchannels", self.subchannels, "an integer >= 1")


SHARE_TOLERANCE = 1e-9  # the class shares must sum to 1 within this


def _is_range(value: list[float] | None) -> bool:
    return value is None or (len(value) == 2 and 0 < value[0] <= value[1])


@dataclass(frozen=True)
class DeviceClass:
    """One kind of device in the fleet (docs/concepts/system-model.md#device-classes): its share of the population,
    memory budget, clock range and, optionally, its own channel statistics."""

    name: str = field(default="", metadata={"help": "the class's name in the reports (allocation.csv, summary)"})
    share: float = field(default=1.0, metadata={"help": "share of the population in this class; shares sum to 1"})
    memory_mib: float = field(default=0.0, metadata={
        "help": "memory budget in MiB, compared with the measured device-part peak (summary: devices_over_memory)"})
    clock_hz: list[float] = field(default_factory=list, metadata={
        "help": "[low, high]: the class's clocks f_k ~ U[low, high] in Hz"})
    distance_m: list[float] | None = field(default=None, metadata={
        "help": "[near, far]: the class's devices placed at U[near, far] metres (null: system.min/max_distance_m)"})
    shadowing_db: float | None = field(default=None, metadata={
        "help": "the class's log-normal shadowing std dev in dB (null: system.shadowing_db)"})
    lora_rank: int | None = field(default=None, metadata={
        "help": "the LoRA rank of the class's devices, 1..lora.rank: required with lora.rank_policy=by-class, null "
                "with fixed"})

    def __post_init__(self) -> None:
        _check(bool(self.name) and "," not in self.name, f"devices.classes[{self.name}].name", self.name,
               "a non-empty name without commas")
        _check(0 < self.share <= 1, f"devices.classes[{self.name}].share", self.share, "a number in (0, 1]")
        _check(self.memory_mib > 0, f"devices.classes[{self.name}].memory_mib", self.memory_mib, "a number > 0")
        _check(self.clock_hz is not None and _is_range(self.clock_hz), f"devices.classes[{self.name}].clock_hz",
               self.clock_hz, "[low, high] in Hz with 0 < low <= high")
        _check(_is_range(self.distance_m), f"devices.classes[{self.name}].distance_m", self.distance_m,
               "[near, far] in metres with 0 < near <= far, or null for system.min/max_distance_m")
        _check(self.shadowing_db is None or self.shadowing_db >= 0, f"devices.classes[{self.name}].shadowing_db",
               self.shadowing_db, "a number >= 0, or null for system.shadowing_db")
        _check(self.lora_rank is None or (isinstance(self.lora_rank, int) and self.lora_rank >= 1),
               f"devices.classes[{self.name}].lora_rank", self.lora_rank, "an integer >= 1, or null")


@dataclass(frozen=True)
class DevicesConfig:
    """The device fleet: classes of devices drawn by their shares with the run's seed (none: one population).

    Without classes every device draws its clock and channel from the system section (docs/concepts/system-model.md).
    """

    SECTION: ClassVar[str] = "devices"
    classes: list[DeviceClass] = field(default_factory=list, metadata={
        "help": "device classes (name, share, memory_mib, clock_hz, distance_m, shadowing_db); empty: every device "
                "from system.min/max_clock_hz and the system section's channel"})

    def __post_init__(self) -> None:
        names = [c.name for c in self.classes]
        _check(len(set(names)) == len(names), "devices.classes", names, "classes with distinct names")
        shares = [c.share for c in self.classes]
        total = math.fsum(shares)
        _check(not self.classes or abs(total - 1.0) <= SHARE_TOLERANCE, "devices.classes[].share", shares,
               f"shares that sum to 1 within {SHARE_TOLERANCE:g} (these sum to {total:.12g})")


@dataclass(frozen=True)
class AllocationConfig:
    """How each round chooses bits, transmit power and bandwidth per device (docs/concepts/allocator.md)."""

    SECTION: ClassVar[str] = "allocation"
    policy: str = field(default="sflam", metadata={"help": "sflam (joint optimisation) | equal (B/K, P_max)"})
    lam: float = field(default=0.5, metadata={"help": "weight of latency in lam*T/T0 + (1-lam)*E/E0"})
    bits: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32],
                            metadata={"help": "activation bit widths the allocator may choose"})
    distortion_bits: float = field(default=6.0, metadata={
        "help": "distortion budget stated as an average bit width: sum_k w_k D(q_k) <= D(this), D = the codec's "
                "variance bound (6: poor channels may send fewer bits, good ones more)"})
    deadline_s: float | None = field(default=None, metadata={"help": "round deadline T_max in seconds"})
    max_latency_factor: float = field(default=10.0, metadata={
        "help": "without a deadline, the round latency is capped at this multiple of T0"})
    energy_cap_j: float | None = field(default=None, metadata={"help": "per-device energy cap per round"})
    bits_search: str = field(default="greedy", metadata={"help": "greedy (BCD) | exhaustive (small K)"})

    def __post_init__(self) -> None:
        _check(self.policy in ALLOCATION_POLICIES, "allocation.policy", self.policy,
               f"one of {', '.join(ALLOCATION_POLICIES)}")
        _check(0.0 <= self.lam <= 1.0, "allocation.lam", self.lam, "a number in [0, 1]")
        _check(bool(self.bits), "allocation.bits", self.bits, "a non-empty list of bit widths")
        for value in self.bits:
            _check(_allowed_bits(value), "allocation.bits", value, "bit widths in 1..16, or 32 for raw fp32")
        _check(1.0 <= self.distortion_bits <= 16.0 or self.distortion_bits == 32, "allocation.distortion_bits",
               self.distortion_bits, "a bit width in [1, 16], or 32 (no distortion: every device at fp32)")
        _check(min(self.bits) <= self.distortion_bits, "allocation.distortion_bits", self.distortion_bits,
               f"at least the smallest of allocation.bits={sorted(self.bits)}, else no bit width meets the budget")
        _check(self.deadline_s is None or self.deadline_s > 0, "allocation.deadline_s", self.deadline_s,
               "a number > 0, or null for none")
        _check(self.max_latency_factor > 1.0, "allocation.max_latency_factor", self.max_latency_factor,
               "a number > 1")
        _check(self.energy_cap_j is None or self.energy_cap_j > 0, "allocation.energy_cap_j", self.energy_cap_j,
               "a number > 0, or null for none")
        _check(self.bits_search in BITS_SEARCHES, "allocation.bits_search", self.bits_search,
               f"one of {', '.join(BITS_SEARCHES)}")


@dataclass(frozen=True)
class RayConfig:
    """The Ray runtime's edge-worker pool (docs/concepts/ray-runtime.md): actors are execution slots, devices are
    data."""

    SECTION: ClassVar[str] = "ray"
    address: str | None = field(default=None, metadata={"help": "cluster address (None: RAY_ADDRESS or a local one)"})
    workers: int = field(default=0, metadata={"help": "edge worker actors (0: from the cluster's CPUs)"})
    devices_per_worker: int = field(default=0, metadata={"help": "most virtual devices per worker (0: spread evenly)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved by each edge worker"})
    threads_per_worker: int = field(default=1, metadata={"help": "torch threads inside each actor"})
    local_cpus: int = field(default=0, metadata={"help": "logical CPUs of a local cluster (0: enough for the pool)"})
    placement: str = field(default="spread", metadata={
        "help": "edge workers over the nodes: spread (one node after another) | default (Ray's packing policy)"})
    gpus_per_worker: float = field(default=0.0, metadata={
        "help": "GPUs of each edge worker (its device part runs there; 0.5: two share one)"})
    resources: dict[str, float] = field(default_factory=dict, metadata={
        "help": "custom Ray resources each edge worker needs (e.g. {edge: 1} for nodes started with that resource)"})
    placement_timeout_s: float = field(default=600.0, metadata={
        "help": "seconds for the cluster to place and build the actors (model loading included) before the run "
                "stops with one line"})

    def __post_init__(self) -> None:
        _check(self.workers >= 0, "ray.workers", self.workers, "an integer >= 0 (0 = from the cluster)")
        _check(self.devices_per_worker >= 0, "ray.devices_per_worker", self.devices_per_worker,
               "an integer >= 0 (0 = spread evenly)")
        _check(self.cpus_per_worker > 0, "ray.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        _check(self.threads_per_worker >= 1, "ray.threads_per_worker", self.threads_per_worker, "an integer >= 1")
        _check(self.local_cpus >= 0, "ray.local_cpus", self.local_cpus, "an integer >= 0")
        _check(self.placement in EDGE_PLACEMENTS, "ray.placement", self.placement,
               f"one of {', '.join(EDGE_PLACEMENTS)}")
        _check(self.gpus_per_worker >= 0, "ray.gpus_per_worker", self.gpus_per_worker, "a number >= 0")
        _check_resources("ray.resources", self.resources)
        _check(self.placement_timeout_s > 0, "ray.placement_timeout_s", self.placement_timeout_s, "a number > 0")


@dataclass(frozen=True)
class ServerConfig:
    """The server-part group: one torch actor, or W DeepSpeed ranks sharding each step's batch."""

    SECTION: ClassVar[str] = "server"
    engine: str = field(default="torch", metadata={"help": "torch (one rank) | deepspeed (ZeRO 0-3, W ranks)"})
    ranks: int = field(default=1, metadata={"help": "W server actors (deepspeed only; torch uses 1)"})
    zero_stage: int = field(default=0, metadata={"help": "DeepSpeed ZeRO stage 0..3"})
    backend: str | None = field(default=None, metadata={"help": "collectives: gloo | nccl (None: nccl on GPU)"})
    gpus_per_rank: float = field(default=0.0, metadata={"help": "GPUs reserved by each server rank"})
    offload_optimizer: bool = field(default=False, metadata={"help": "ZeRO optimizer state offload to CPU"})
    placement: str = field(default="pack", metadata={
        "help": "server ranks over the nodes (a Ray placement group): pack (fewest nodes) | spread (one per node)"})
    resources: dict[str, float] = field(default_factory=dict, metadata={
        "help": "custom Ray resources each server rank needs (e.g. {server: 1})"})
    threads: int = field(default=0, metadata={
        "help": "torch threads of each server rank's steps (0: a step of more than one chunk of samples gets its "
                "node's CPUs shared by the ranks, as the edge workers wait for its gradients; a smaller one 1)"})

    def __post_init__(self) -> None:
        _check(self.threads >= 0, "server.threads", self.threads, "an integer >= 0 (0: the node's CPUs / ranks)")
        _check(self.engine in ENGINES, "server.engine", self.engine, f"one of {', '.join(ENGINES)}")
        _check(self.ranks >= 1, "server.ranks", self.ranks, "an integer >= 1")
        _check(self.engine == "deepspeed" or self.ranks == 1, "server.ranks", self.ranks,
               "1 with server.engine=torch (use deepspeed for several ranks)")
        _check(0 <= self.zero_stage <= 3, "server.zero_stage", self.zero_stage, "an integer in 0..3")
        _check(self.backend in (None, "gloo", "nccl"), "server.backend", self.backend, "gloo, nccl or null")
        _check(self.gpus_per_rank >= 0, "server.gpus_per_rank", self.gpus_per_rank, "a number >= 0")
        _check(self.placement in SERVER_PLACEMENTS, "server.placement", self.placement,
               f"one of {', '.join(SERVER_PLACEMENTS)}")
        _check_resources("server.resources", self.resources)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking: where runs go and how often metrics are written."""

    SECTION: ClassVar[str] = "tracking"
    enabled: bool = field(default=True, metadata={"help": "record the run in MLflow"})
    uri: str | None = field(default=None, metadata={
        "help": "tracking URI (None: MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db)"})
    experiment: str | None = field(default=None, metadata={"help": "MLflow experiment name (None: the run name)"})
    flush_every: int = field(default=5, metadata={"help": "rounds between batched metric writes"})

    def __post_init__(self) -> None:
        _check(self.flush_every >= 1, "tracking.flush_every", self.flush_every, "an integer >= 1")


@dataclass(frozen=True)
class AggregationConfig:
    """How a round's device adapters become the next global adapter (docs/concepts/round-engine.md)."""

    SECTION: ClassVar[str] = "aggregation"
    strategy: str = field(default="fedavg", metadata={
        "help": "fedavg | fedprox (proximal term) | fedadam | fedyogi (server optimizer) | ffa-lora (A frozen)"})
    weights: str = field(default="trained", metadata={
        "help": "trained: samples each device trained this round | shard: the device's data size"})
    proximal_mu: float = field(default=0.01, metadata={"help": "fedprox: mu of mu/2 ||w - w_global||^2"})
    server_lr: float = field(default=0.01, metadata={"help": "fedadam / fedyogi: server learning rate eta"})
    beta1: float = field(default=0.9, metadata={"help": "fedadam / fedyogi: first-moment decay"})
    beta2: float = field(default=0.99, metadata={"help": "fedadam / fedyogi: second-moment decay"})
    tau: float = field(default=1e-3, metadata={"help": "fedadam / fedyogi: adaptivity tau (Reddi et al. 2021)"})

    def __post_init__(self) -> None:
        _check(self.strategy in AGGREGATION_STRATEGIES, "aggregation.strategy", self.strategy,
               f"one of {', '.join(AGGREGATION_STRATEGIES)}")
        _check(self.weights in AGGREGATION_WEIGHTS, "aggregation.weights", self.weights, "trained or shard")
        _check(self.proximal_mu >= 0, "aggregation.proximal_mu", self.proximal_mu, "a number >= 0")
        _check(self.server_lr > 0, "aggregation.server_lr", self.server_lr, "a number > 0")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            _check(0 <= value < 1, f"aggregation.{key}", value, "a number in [0, 1)")
        _check(self.tau > 0, "aggregation.tau", self.tau, "a number > 0")


def _valid_trace(path: str) -> bool:
    import csv

    if not Path(path).is_file():
        return False
    with Path(path).open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"device", "round"} <= set(reader.fieldnames or ()):
            return False
        return all(row["device"].strip().isdigit() and row["round"].strip().isdigit() for row in reader)


@dataclass(frozen=True)
class ParticipationConfig:
    """Which devices take part in a round: availability, mid-round dropouts, over-selection
    (docs/concepts/round-engine.md)."""

    SECTION: ClassVar[str] = "participation"
    availability: float = field(default=1.0, metadata={"help": "probability a device is available in a round"})
    trace: str | None = field(default=None, metadata={
        "help": "availability trace: CSV of device,round rows (0-based) listing when each device is available"})
    dropout: float = field(default=0.0, metadata={
        "help": "probability a selected device drops out mid-round (its adapter is discarded)"})
    over_selection: float = field(default=0.0, metadata={
        "help": "select ceil(K (1 + x)) devices and keep the K that finish first by the cost model"})

    def __post_init__(self) -> None:
        _check(0 < self.availability <= 1, "participation.availability", self.availability, "a number in (0, 1]")
        _check(self.trace is None or _valid_trace(self.trace), "participation.trace", self.trace,
               "an existing CSV file with columns device,round of integers >= 0")
        _check(0 <= self.dropout < 1, "participation.dropout", self.dropout, "a number in [0, 1)")
        _check(self.over_selection >= 0, "participation.over_selection", self.over_selection, "a number >= 0")


PRIVACY_ATTACKS = ("linear", "inverse-model", "white-box")


@dataclass(frozen=True)
class PrivacyConfig:
    """Attacks on the smashed data and the defences against them (docs/concepts/privacy.md; `sflam attack`)."""

    SECTION: ClassVar[str] = "privacy"
    attacks: list[str] = field(default_factory=lambda: list(PRIVACY_ATTACKS), metadata={
        "help": "attacks to run: linear (least-squares baseline) | inverse-model (learned) | white-box (optimised)"})
    aux_samples: int = field(default=2000, metadata={
        "help": "auxiliary samples of the attacker: a seeded part of the train split, never a victim"})
    inverse_steps: int = field(default=300, metadata={"help": "training steps of the inverse model"})
    optimisation_steps: int = field(default=100, metadata={
        "help": "steps of the white-box inversion (Adam for text, L-BFGS evaluations for images)"})
    victims: int = field(default=32, metadata={"help": "held-out test samples whose messages are attacked"})
    seed: int = field(default=0, metadata={"help": "seed of the attacks (aux choice, codec streams, inits)"})
    evaluate_every: int = field(default=0, metadata={
        "help": "measure a run's leakage every n rounds and after the last (0 = off): the `monitor` attacks"})
    monitor: list[str] = field(default_factory=lambda: ["linear"], metadata={
        "help": "attacks of the per-round leakage (evaluate_every): cheap ones, the full suite is `sflam attack`"})
    monitor_aux_samples: int = field(default=500, metadata={"help": "auxiliary samples of the per-round attacks"})
    noise_sigma: float = field(default=0.0, metadata={
        "help": "defence: Gaussian noise N(0, sigma^2 C^2) per message element after clipping (0 = off)"})
    clip_norm: float = field(default=0.0, metadata={
        "help": "defence: each sample's whole message clipped to L2 norm C (0 = off; required by noise)"})
    nopeek_weight: float = field(default=0.0, metadata={
        "help": "defence: weight of the distance correlation (NoPeek) in the device loss (0 = off)"})
    delta: float = field(default=1e-5, metadata={"help": "delta of the reported (epsilon, delta) guarantee"})

    def __post_init__(self) -> None:
        _check(bool(self.attacks), "privacy.attacks", self.attacks, f"a non-empty list of {', '.join(PRIVACY_ATTACKS)}")
        for name in self.attacks:
            _check(name in PRIVACY_ATTACKS, "privacy.attacks", name, f"names from {', '.join(PRIVACY_ATTACKS)}")
        for name in self.monitor:
            _check(name in PRIVACY_ATTACKS, "privacy.monitor", name, f"names from {', '.join(PRIVACY_ATTACKS)}")
        for key in ("aux_samples", "inverse_steps", "optimisation_steps", "victims", "monitor_aux_samples"):
            value = getattr(self, key)
            _check(value >= 1, f"privacy.{key}", value, "an integer >= 1")
        _check(self.evaluate_every >= 0, "privacy.evaluate_every", self.evaluate_every, "an integer >= 0 (0 = off)")
        for key in ("noise_sigma", "clip_norm", "nopeek_weight"):
            value = getattr(self, key)
            _check(value >= 0, f"privacy.{key}", value, "a number >= 0 (0 = off)")
        _check(self.noise_sigma == 0 or self.clip_norm > 0, "privacy.clip_norm", self.clip_norm,
               f"a number > 0 with privacy.noise_sigma={self.noise_sigma} (the noise is sigma times the clip norm)")
        _check(0 < self.delta < 1, "privacy.delta", self.delta, "a number in (0, 1)")


OBJECTIVES = {"accuracy": "maximize", "loss": "minimize", "round_latency_s": "minimize",
              "comm_latency_s": "minimize", "energy_j": "minimize", "device_memory_bytes": "minimize",
              "energy_efficiency_samples_per_j": "maximize", "leakage": "minimize", "privacy_epsilon": "minimize"}
SAMPLERS = ("nsga2", "tpe", "random")


def _check_space(space: dict[str, Any]) -> None:
    for key, spec in space.items():
        where = f"study.space.{key}"
        _check(isinstance(spec, dict), where, spec, "a mapping with type: int | float | categorical")
        kind = spec.get("type")
        _check(kind in ("int", "float", "categorical"), f"{where}.type", kind, "int, float or categorical")
        if kind == "categorical":
            choices = spec.get("choices")
            _check(isinstance(choices, list) and len(choices) >= 1, f"{where}.choices", choices,
                   "a non-empty list")
        else:
            low, high = spec.get("low"), spec.get("high")
            ok = isinstance(low, (int, float)) and isinstance(high, (int, float)) and low <= high
            _check(ok, f"{where}.low", low, f"numbers low <= high (high={high})")
            _check(not spec.get("log") or low > 0, f"{where}.low", low, "a number > 0 with log: true")
        extra = set(spec) - {"type", "choices", "low", "high", "log", "step"}
        _check(not extra, where, sorted(extra), "only the keys type, choices, low, high, log, step")


@dataclass(frozen=True)
class StudyConfig:
    """Design-space exploration with Optuna (docs/how-to/tracking.md): the search space is data."""

    SECTION: ClassVar[str] = "study"
    name: str | None = field(default=None, metadata={"help": "study name in the storage (None: the run name)"})
    storage: str | None = field(default=None, metadata={
        "help": "SQLAlchemy URL (postgresql://... for several processes or nodes: `sflam db start` prints one), or "
                "a journal file ending in .log (None: sqlite:///<output_dir>/optuna.db; with study.parallel > 1 on "
                "a cluster of several nodes the `sflam db` server of output_dir)"})
    trials: int = field(default=8, metadata={"help": "trials to run (added to the study on --resume)"})
    objectives: list[str] = field(default_factory=lambda: ["accuracy", "round_latency_s", "energy_j",
                                                           "device_memory_bytes"],
                                  metadata={"help": "one (single-objective) or several (multi-objective)"})
    sampler: str = field(default="nsga2", metadata={"help": "nsga2 | tpe | random"})
    parallel: int = field(default=1, metadata={"help": "trials at once; > 1 runs them as Ray tasks"})
    heartbeat_interval: int = field(default=10, metadata={
        "help": "seconds between the heartbeats a running trial records in an SQL storage (Optuna's RDB heartbeat)"})
    grace_period: int = field(default=60, metadata={
        "help": "seconds without a heartbeat after which a running trial is marked FAIL (its worker or node died)"})
    retries: int = field(default=1, metadata={
        "help": "times a trial marked FAIL for a lost heartbeat is run again (Optuna's retry callback)"})
    prune: bool = field(default=True, metadata={"help": "median pruning on per-round reports (single objective)"})
    seed: int = field(default=0, metadata={"help": "sampler seed"})
    space: dict[str, Any] = field(default_factory=dict, metadata={"help": "dotted key -> {type, low/high/choices}"})

    def __post_init__(self) -> None:
        _check(self.trials >= 1, "study.trials", self.trials, "an integer >= 1")
        _check(bool(self.objectives), "study.objectives", self.objectives, "a non-empty list")
        for name in self.objectives:
            _check(name in OBJECTIVES, "study.objectives", name, f"names from {', '.join(OBJECTIVES)}")
        _check(self.sampler in SAMPLERS, "study.sampler", self.sampler, f"one of {', '.join(SAMPLERS)}")
        _check(self.parallel >= 1, "study.parallel", self.parallel, "an integer >= 1")
        _check(self.heartbeat_interval >= 1, "study.heartbeat_interval", self.heartbeat_interval, "an integer >= 1")
        _check(self.grace_period > self.heartbeat_interval, "study.grace_period", self.grace_period,
               f"an integer > study.heartbeat_interval={self.heartbeat_interval}")
        _check(self.retries >= 0, "study.retries", self.retries, "an integer >= 0")
        _check_space(self.space)


@dataclass(frozen=True)
class TuneConfig:
    """`sflam compare --tune`: each method's own learning rates from an Optuna study on validation data
    (docs/how-to/compare.md#tuned-comparisons)."""

    SECTION: ClassVar[str] = "tune"
    trials: int = field(default=8, metadata={"help": "Optuna trials per method"})
    rounds: int = field(default=0, metadata={
        "help": "rounds of each trial, at most train.rounds (0: a third of train.rounds, at least 1)"})
    knobs: list[str] = field(default_factory=lambda: list(TUNE_KNOBS), metadata={
        "help": "what is tuned: device_lr (every method) and server_lr (the methods with a server part: all but "
                "fl), each on a log scale over [lr_low, lr_high]"})
    lr_low: float = field(default=1e-4, metadata={"help": "lowest learning rate a trial may draw"})
    lr_high: float = field(default=3e-2, metadata={"help": "highest learning rate a trial may draw"})
    sampler: str = field(default="tpe", metadata={
        "help": "tpe (random for the first half of the trials, then TPE) | random"})
    seed: int = field(default=0, metadata={"help": "sampler seed"})

    def trial_rounds(self, train_rounds: int) -> int:
        """Rounds each trial trains: tune.rounds, or a third of the full run's."""
        return self.rounds or max(1, train_rounds // 3)

    def __post_init__(self) -> None:
        _check(self.trials >= 1, "tune.trials", self.trials, "an integer >= 1")
        _check(self.rounds >= 0, "tune.rounds", self.rounds, "an integer >= 0 (0 = a third of train.rounds)")
        _check(bool(self.knobs), "tune.knobs", self.knobs, f"a non-empty list from {', '.join(TUNE_KNOBS)}")
        for knob in self.knobs:
            _check(knob in TUNE_KNOBS, "tune.knobs", knob, f"names from {', '.join(TUNE_KNOBS)}")
        _check(len(set(self.knobs)) == len(self.knobs), "tune.knobs", self.knobs, "each knob once")
        _check(self.lr_low > 0, "tune.lr_low", self.lr_low, "a number > 0 (the range is searched on a log scale)")
        _check(self.lr_high > self.lr_low, "tune.lr_high", self.lr_high, f"a number > tune.lr_low={self.lr_low}")
        _check(self.sampler in TUNE_SAMPLERS, "tune.sampler", self.sampler, f"one of {', '.join(TUNE_SAMPLERS)}")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: every concern's dataclass, composed; passed explicitly, never global."""

    name: str = "sflam"
    seed: int = 0
    runtime: str = "local"
    output_dir: str = "results"
    threads: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        _check(self.runtime in RUNTIMES, "runtime", self.runtime, f"one of {', '.join(RUNTIMES)}")
        _check(self.threads >= 0, "threads", self.threads, "an integer >= 0 (0 = torch default)")
        _check(self.train.devices_per_round <= self.data.num_devices, "train.devices_per_round",
               self.train.devices_per_round, f"at most data.num_devices={self.data.num_devices}")
        _check(self.server.ranks <= self.train.devices_per_round, "server.ranks", self.server.ranks,
               f"at most train.devices_per_round={self.train.devices_per_round} (every rank needs a device)")
        rc, K = self.ray, self.train.devices_per_round
        per_worker = -(-K // min(max(rc.workers, 1), K))  # devices each of ray.workers must serve
        _check(not (rc.workers and rc.devices_per_worker) or per_worker <= rc.devices_per_worker,
               "ray.devices_per_worker", rc.devices_per_worker,
               f"at least {per_worker} (train.devices_per_round={K} over ray.workers={rc.workers}), or 0")
        _check(self.system.access == "fdma" or self.system.subchannels >= K, "system.subchannels",
               self.system.subchannels, f"at least train.devices_per_round={K} with system.access=ofdma")
        options = len(set(self.allocation.bits) | {self.quant.activation_bits})
        _check(self.allocation.bits_search != "exhaustive" or options**K <= EXHAUSTIVE_LIMIT,
               "allocation.bits_search", self.allocation.bits_search,
               f"greedy when {options} bit options ^ {K} devices per round exceeds {EXHAUSTIVE_LIMIT} combinations")
        _check(self.runtime == "ray" or self.server.engine == "torch", "server.engine", self.server.engine,
               "torch with runtime=local (deepspeed runs in the Ray runtime)")
        objectives = self.study.objectives
        _check("leakage" not in objectives or self.privacy.evaluate_every > 0, "privacy.evaluate_every",
               self.privacy.evaluate_every, "an integer >= 1 with study.objectives containing leakage (it is measured "
               "by the per-round attacks)")
        # sigma searched by the study: each trial's own value is checked when its config is built
        _check("privacy_epsilon" not in objectives or self.privacy.noise_sigma > 0
               or "privacy.noise_sigma" in self.study.space, "privacy.noise_sigma", self.privacy.noise_sigma,
               "a number > 0 (or searched in study.space) with study.objectives containing privacy_epsilon")
        _check(self.tune.rounds <= self.train.rounds, "tune.rounds", self.tune.rounds,
               f"at most train.rounds={self.train.rounds} (a trial is a shortened run), or 0")
        _check(self.split.head == "server" or self.runtime == "local", "split.head", self.split.head,
               "server with runtime=ray (the U-shaped split runs in the reference runtime, runtime=local)")
        # LoRA ranks per class: every class names its rank under by-class, at most lora.rank (the global adapter's)
        lora, classes = self.lora, self.devices.classes
        _check(lora.rank_policy == "fixed" or bool(classes), "lora.rank_policy", lora.rank_policy,
               "fixed without devices.classes (by-class takes each class's lora_rank)")
        for c in classes:
            _check(lora.rank_policy == "by-class" or c.lora_rank is None, f"devices.classes[{c.name}].lora_rank",
                   c.lora_rank, "null with lora.rank_policy=fixed (set lora.rank_policy=by-class for ranks per class)")
            _check(lora.rank_policy == "fixed" or (c.lora_rank is not None and c.lora_rank <= lora.rank),
                   f"devices.classes[{c.name}].lora_rank", c.lora_rank,
                   f"an integer in 1..lora.rank={lora.rank} with lora.rank_policy=by-class")
        # devices at different cuts: budgets from the classes, one server part above the shallowest cut
        split = self.split
        if split.mixed:
            _check(bool(classes), "split.policy", split.policy,
                   "fixed without devices.classes (memory and joint read each class's memory_mib)")
            _check(split.head == "server", "split.head", split.head, f"server with split.policy={split.policy}")
            _check(self.lora.server, "lora.server", self.lora.server,
                   f"true with split.policy={split.policy} (the server trains the layers between the cuts for the "
                   "devices below them)")
            _check(self.server.engine == "torch", "server.engine", self.server.engine,
                   f"torch with split.policy={split.policy} (a DeepSpeed group runs every sample from one cut)")

    def to_flat(self) -> dict[str, Any]:
        """Flat dict of dotted keys (the same keys as the overrides and the MLflow params)."""
        return flatten(dataclasses.asdict(self))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- building and overrides


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted != "study.space":  # the search space stays one value
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check one YAML value against a field's type; ints widen to floats, numeric strings to floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [opt for opt in options if opt is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a mapping")
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(key, value, "a list")
        return [_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):  # an item of a list of records
        if not isinstance(value, dict):
            raise ConfigError(key, value, f"a mapping of {annotation.__name__} keys")
        return _build(annotation, value, key + ".")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, value, "an integer")
    if annotation is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ConfigError(key, value, "a finite number")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "a string")
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(dotted, value, f"unknown key; known keys here: {', '.join(sorted(fields))}")
        annotation = hints[key]
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(dotted, value, f"a mapping of {annotation.__name__} keys")
            kwargs[key] = _build(annotation, value, dotted + ".")
        else:
            kwargs[key] = _coerce(dotted, value, annotation)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """`split.cut_layer=2` -> ("split.cut_layer", 2); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(text, text, "an override of the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); unknown keys are caught when the config is built."""
    out = _deepcopy(tree)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(dotted, value, f"{part} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deepcopy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else v)
            for k, v in tree.items()}


def config_from_dict(tree: dict[str, Any], overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    merged = apply_overrides(tree, overrides or {})
    return _build(ExperimentConfig, merged, "")


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML file (None: built-in defaults), apply overrides, validate everything."""
    tree: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError("config", str(path), "an existing YAML file")
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError("config", str(path), f"valid YAML ({first})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("config", str(path), "a YAML mapping of sections")
        tree = loaded or {}
    if isinstance(overrides, list):
        overrides = dict(parse_override(item) for item in overrides)
    return config_from_dict(tree, overrides)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
