"""The round plan: a round's per-device work from its mini-batches' shapes, priced by the cost model under the
schedule the runtime executes, allocated by the configured policy, with its makespan (the system model)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from sflam.platform import codec
from sflam.platform.allocation import (
    Allocation,
    AllocationProblem,
    allocate,
    distortion,
    equal_allocation,
    reference_costs,
)
from sflam.platform.allocation.cuts import CutOptions, allocate_cuts, exhaustive_cuts_fit
from sflam.platform.config import ExperimentConfig
from sflam.platform.data import BatchShape
from sflam.platform.flops import FlopTable
from sflam.platform.messages import HEADER_BITS_PER_SAMPLE, U_HEADER_BITS_PER_SAMPLE
from sflam.platform.schedule import (
    Phases,
    finish_times,
    latency,
    lockstep_phases,
    lockstep_stage_compute,
    lockstep_stage_payloads,
)
from sflam.platform.server import cut_chunks, server_chunks
from sflam.platform.system import Population, compute_energy_j, compute_latency_s, noise_w_per_hz


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    """What the allocator decided for a round, the schedule it runs in, and what it costs."""

    devices: np.ndarray
    allocation: Allocation
    samples: np.ndarray
    phases: Phases
    schedule: str
    gain: np.ndarray
    solo_s: np.ndarray  # each device's own chain of phases at an equal share and full power: its speed
    classes: tuple[str, ...] = ()  # each device's class (devices.classes; empty: a homogeneous population)
    ranks: tuple[int, ...] = ()  # each device's LoRA rank (lora.rank_policy=by-class; empty: all at lora.rank)
    cuts: tuple[int, ...] = ()  # each device's cut layer (split.policy memory or joint; empty: all at cut_layer)

    @property
    def compute_s(self) -> np.ndarray:
        """Each device's own computation in the round."""
        return np.sum(self.phases.forward + self.phases.backward, axis=1)

    def metrics(self) -> dict[str, float]:
        a = self.allocation
        lat = latency(self.phases, self.schedule)
        return {
            "round_latency_s": lat.round_s,
            "comm_latency_s": lat.comm_s,
            "compute_latency_s": lat.compute_s,
            "energy_j": a.total_energy_j,
            "bits_mean": float(np.mean(a.bits)),
            "bits_min": float(np.min(a.bits)),
            "bits_max": float(np.max(a.bits)),
            "power_mean_w": float(np.mean(a.power_w)),
            "power_max_w": float(np.max(a.stage_power_w)),
            "bandwidth_min_hz": float(np.min(a.bandwidth_hz)),
            "bandwidth_max_hz": float(np.max(a.bandwidth_hz)),
            "objective": a.objective,
        }

    def table(self) -> list[dict[str, Any]]:
        """One row per device: the per-device allocation CSV (power and bandwidth averaged over the stages)."""
        a = self.allocation
        compute = self.compute_s
        rows: list[dict[str, Any]] = [{"device": int(k), "samples": int(self.samples[i]), "gain": float(self.gain[i]),
                 "bits": int(a.bits[i]), "power_w": float(a.power_w[i]), "bandwidth_hz": float(a.bandwidth_hz[i]),
                 "uplink_s": float(a.uplink_s[i].sum()), "downlink_s": float(a.downlink_s[i].sum()),
                 "compute_s": float(compute[i]), "finish_s": float(a.latency_s[i]),
                 "energy_j": float(a.energy_j[i])} for i, k in enumerate(self.devices)]
        if a.stage_subchannels is not None:  # OFDMA: whole subchannels in each stage
            for i, row in enumerate(rows):
                row["subchannels"] = " ".join(str(int(n)) for n in a.stage_subchannels[i])
        if self.classes:  # a fleet of device classes: each device's class beside its id
            rows = [{"device": row["device"], "class": name, **row} for row, name in zip(rows, self.classes,
                                                                                         strict=True)]
        if self.ranks:  # LoRA ranks per class: each device's rank beside its class
            rows = [{"device": row.pop("device"), **({"class": row.pop("class")} if "class" in row else {}),
                     "rank": rank, **row} for row, rank in zip(rows, self.ranks, strict=True)]
        if self.cuts:  # devices at several cuts: each device's cut beside its class (and rank)
            rows = [{"device": row.pop("device"), **({"class": row.pop("class")} if "class" in row else {}),
                     **({"rank": row.pop("rank")} if "rank" in row else {}), "cut": cut, **row}
                    for row, cut in zip(rows, self.cuts, strict=True)]
        return rows


@dataclass(frozen=True, kw_only=True)
class RoundInputs:
    """A round's per-device work, known before it starts: samples, compute phases, payloads."""

    samples: np.ndarray          # (K,)
    forward_s: np.ndarray        # (K, E)
    backward_s: np.ndarray       # (K, E)
    server_s: np.ndarray         # (E,) over the whole batch, or (K, E) per device (sequential)
    compute_energy_j: np.ndarray  # (K,)
    gain: np.ndarray             # (K,)


class RoundPlanner:
    """Builds each round's phases from its mini-batches' shapes, allocates and prices them under `schedule`.

    lockstep (sfl, sfl-q, sflam), sequential (sl: devices one after another, each alone on the whole band),
    server-sequential (sfl-v2: the devices in parallel on their shares of the band, the server serving one
    device's steps after another) or parallel (fl: the whole model on the device, only adapters travel;
    `flops` then counts the whole model as the device part).
    """

    def __init__(self, config: ExperimentConfig, flops: FlopTable, adapter_bits: int, trains_device: bool,
                 schedule: str = "lockstep", head_width: int = 0, rank_bits: dict[int, int] | None = None) -> None:
        """`adapter_bits`: the global adapter's payload; `rank_bits`: a device's at each class's LoRA rank
        (lora.rank_policy=by-class; a rank not listed pays the global adapter's)."""
        self.config = config
        self.head_width = head_width  # a U-shaped split: the features the server sends per sample
        self.flops = flops
        self.adapter_bits = adapter_bits
        self.rank_bits = dict(rank_bits or {})
        self.memory_by_rank: dict[int, int] = {}  # the measured device-part peak at each class rank (plan_costs)
        # devices at several cuts (split.policy memory or joint; set by plan_costs): the FLOP table, the measured
        # device-part peak and the adapter payload at each candidate cut, and (memory) each class's cut
        self.flops_by_cut: dict[int, FlopTable] = {}
        self.memory_by_cut: dict[int, int] = {}
        self.adapter_bits_by_cut: dict[tuple[int, int | None], int] = {}
        self.class_cuts: dict[str, int] = {}
        self.last_cuts: tuple[int, ...] = ()  # the cuts of the latest plan (what the deployed fleet runs)
        self.trains_device = trains_device
        self.schedule = schedule
        if schedule == "server-sequential" and config.split.head == "device":
            raise ValueError("split.head=device with sfl-v2: the U-shaped split is priced for the lockstep and sl only")
        self.population = Population.place(config.system, config.data.num_devices, config.seed, config.devices)
        alloc = config.allocation
        self.options = np.array(sorted(set(alloc.bits) | {config.quant.activation_bits}))
        self.budget = float(distortion(alloc.distortion_bits))

    # -- the work of a round -----------------------------------------------------------------
    def ranks(self, devices: np.ndarray) -> list[int]:
        """Each device's LoRA rank: its class's under lora.rank_policy=by-class; empty under fixed (all at
        lora.rank)."""
        population, lora = self.population, self.config.lora
        if lora.rank_policy != "by-class" or population.device_class is None:
            return []
        return [population.classes[int(c)].lora_rank or lora.rank
                for c in population.device_class[np.asarray(devices, dtype=np.int64)]]

    def cuts(self, devices: np.ndarray) -> list[int]:
        """Each device's cut under split.policy=memory (its class's, `class_cuts`); empty under fixed (all at
        split.cut_layer) and joint (the plan chooses them)."""
        if self.config.split.policy != "memory":
            return []
        return [self.class_cuts[name] for name in self.population.class_names(devices)]

    def table(self, cut: int | None) -> FlopTable:
        """The FLOP table of a device at `cut` (None: the run's one cut)."""
        return self.flops if cut is None else self.flops_by_cut[cut]

    def inputs(self, round_index: int, devices: np.ndarray, shapes: dict[int, list[BatchShape]],
               cuts: list[int] | None = None) -> RoundInputs:
        """`cuts`: each device's cut (None or empty: the run's one cut); a device's FLOPs are its own cut's, the
        server's step runs each cut group's samples from that cut upward (`server.cut_chunks`)."""
        cfg, sysc = self.config, self.config.system
        K, E = len(devices), cfg.train.local_steps
        fwd_flops, bwd_flops = np.zeros((K, E)), np.zeros((K, E))
        samples = np.zeros(K, dtype=np.int64)
        per_device_server = np.zeros((K, E))
        ranks: list[int | None] = [*self.ranks(devices)] or [None] * K
        at: list[int | None] = list(cuts) if cuts else [None] * K
        for i, k in enumerate(devices):
            table = self.table(at[i])
            for e, shape in enumerate(shapes[int(k)]):
                fwd, bwd = table.device_batch(shape, ranks[i])
                rows = shape.samples
                fwd_flops[i, e], bwd_flops[i, e] = rows * fwd, rows * bwd
                samples[i] += rows
                if self.schedule in ("sequential", "server-sequential"):
                    per_device_server[i, e] = rows * sum(table.server(shape.padded))
        if self.u_shaped:
            return self._u_shaped_inputs(round_index, devices, shapes, fwd_flops, bwd_flops, samples)
        if self.schedule == "lockstep":
            server_flops = np.zeros(E)
            for e in range(E):  # the server's step over the devices still in the round at step e, in its chunks
                present = [(shapes[int(k)][e], at[i]) for i, k in enumerate(devices) if e < len(shapes[int(k)])]
                if not present:
                    continue
                lengths = np.concatenate([shape.lengths for shape, _ in present])
                if cuts:  # each cut group in its own chunks, each from its own cut upward
                    per_sample = np.concatenate([np.full(len(shape.lengths), cut) for shape, cut in present])
                    server_flops[e] = sum(len(chunk) * sum(self.table(cut).server(int(lengths[chunk].max())))
                                          for cut, chunk in cut_chunks(per_sample, lengths))
                else:
                    server_flops[e] = sum(len(chunk) * sum(self.flops.server(int(lengths[chunk].max())))
                                          for chunk in server_chunks(lengths))
            server_s = server_flops / sysc.server_flops
        elif self.schedule in ("sequential", "server-sequential"):
            server_s = per_device_server / sysc.server_flops
        else:
            server_s = np.zeros(0)
        clock = self.population.clock_hz[devices][:, None]
        return RoundInputs(samples=samples, forward_s=compute_latency_s(fwd_flops, clock, sysc),
                           backward_s=compute_latency_s(bwd_flops, clock, sysc), server_s=server_s,
                           compute_energy_j=compute_energy_j((fwd_flops + bwd_flops).sum(axis=1), clock[:, 0], sysc),
                           gain=self.population.gains(devices, cfg.seed, round_index))

    @property
    def u_shaped(self) -> bool:
        """A U-shaped split: per local step two exchanges (smashed data up, features down; features' gradient up,
        smashed data's gradient down) and two server barriers, priced as a lockstep of 2E half steps."""
        return self.config.split.head == "device" and self.schedule != "parallel"

    def _u_shaped_inputs(self, round_index: int, devices: np.ndarray, shapes: dict[int, list[BatchShape]],
                         fwd_flops: np.ndarray, bwd_flops: np.ndarray, samples: np.ndarray) -> RoundInputs:
        """The half steps of a U-shaped round: step e is half step 2e (bottom forward, smashed data up, the server's
        forward, features down, the head's forward and backward on the device) and 2e + 1 (the features' gradient
        up, the server's backward, the smashed data's gradient down, the bottom backward)."""
        cfg, sysc = self.config, self.config.system
        K, E = fwd_flops.shape
        head = np.zeros((K, E))
        server = np.zeros((K, 2 * E)) if self.schedule == "sequential" else np.zeros(2 * E)
        head_flops = sum(self.flops.head(self.head_width))
        for i, k in enumerate(devices):
            for e, shape in enumerate(shapes[int(k)]):
                head[i, e] = shape.samples * head_flops
                if self.schedule == "sequential":
                    fwd, bwd = self.flops.server(shape.padded)
                    server[i, 2 * e], server[i, 2 * e + 1] = shape.samples * fwd, shape.samples * bwd
        if self.schedule == "lockstep":
            for e in range(E):
                present = [shapes[int(k)][e] for k in devices if e < len(shapes[int(k)])]
                if present:
                    lengths = np.concatenate([shape.lengths for shape in present])
                    for chunk in server_chunks(lengths):
                        fwd, bwd = self.flops.server(int(lengths[chunk].max()))
                        server[2 * e] += len(chunk) * fwd
                        server[2 * e + 1] += len(chunk) * bwd
        forward, backward = np.zeros((K, 2 * E)), np.zeros((K, 2 * E))
        forward[:, 0::2] = fwd_flops
        backward[:, 0::2], backward[:, 1::2] = head, bwd_flops
        clock = self.population.clock_hz[devices][:, None]
        return RoundInputs(samples=samples, forward_s=compute_latency_s(forward, clock, sysc),
                           backward_s=compute_latency_s(backward, clock, sysc), server_s=server / sysc.server_flops,
                           compute_energy_j=compute_energy_j((forward + backward).sum(axis=1), clock[:, 0], sysc),
                           gain=self.population.gains(devices, cfg.seed, round_index))

    def _smashed(self, shapes: dict[int, list[BatchShape]], devices: np.ndarray, options: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Smashed-data payloads (K, E, Q), gradient payloads (K, E) and activation elements (K,) of a round; for
        a U-shaped split per half step (K, 2E, ...): the features' gradient up and the features down beside them."""
        if self.u_shaped:
            return self._u_shaped_payloads(shapes, devices, options)
        q, hidden = self.config.quant, self.flops.hidden_size
        K, E = len(devices), self.config.train.local_steps
        up, down, elements = np.zeros((K, E, len(options))), np.zeros((K, E)), np.zeros(K)
        for i, k in enumerate(devices):
            for e, shape in enumerate(shapes[int(k)]):
                tokens = shape.tokens
                header = HEADER_BITS_PER_SAMPLE * shape.samples
                up[i, e] = [codec.payload_bits(tokens, hidden, int(b), q.side_dtype) + header for b in options]
                if self.trains_device:
                    down[i, e] = codec.payload_bits(tokens, hidden, q.gradient_bits, codec.GRADIENT_SIDE_DTYPE)
                elements[i] += tokens * hidden
        return up, down, elements

    def _u_shaped_payloads(self, shapes: dict[int, list[BatchShape]], devices: np.ndarray, options: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, hidden, width = self.config.quant, self.flops.hidden_size, self.head_width
        K, E = len(devices), self.config.train.local_steps
        up, down, elements = np.zeros((K, 2 * E, len(options))), np.zeros((K, 2 * E)), np.zeros(K)
        for i, k in enumerate(devices):
            for e, shape in enumerate(shapes[int(k)]):
                tokens, rows = shape.tokens, shape.samples
                header = U_HEADER_BITS_PER_SAMPLE * rows  # no label leaves the device
                up[i, 2 * e] = [codec.payload_bits(tokens, hidden, int(b), q.side_dtype) + header for b in options]
                up[i, 2 * e + 1] = codec.payload_bits(rows, width, q.gradient_bits, codec.GRADIENT_SIDE_DTYPE)
                down[i, 2 * e] = codec.payload_bits(rows, width, q.activation_bits, codec.GRADIENT_SIDE_DTYPE)
                if self.trains_device:
                    down[i, 2 * e + 1] = codec.payload_bits(tokens, hidden, q.gradient_bits,
                                                            codec.GRADIENT_SIDE_DTYPE)
                elements[i] += tokens * hidden
        return up, down, elements

    def problem(self, round_index: int, devices: np.ndarray, shapes: dict[int, list[BatchShape]],
                lam: float | None = None, inputs: RoundInputs | None = None, cuts: list[int] | None = None
                ) -> AllocationProblem:
        """The allocation problem of a lockstep (or, for fl, parallel) round over the selected devices (`cuts`:
        each device's cut, as in `inputs`)."""
        sysc, alloc = self.config.system, self.config.allocation
        work = inputs or self.inputs(round_index, devices, shapes, cuts)
        K = len(devices)
        ranks = self.ranks(devices)
        bits = [self.rank_bits.get(r, self.adapter_bits) for r in ranks] if ranks else [self.adapter_bits] * K
        if cuts:  # a device at a shallower cut holds the LoRA tensors of its own blocks only
            held: list[int | None] = [*ranks] or [None] * K
            bits = [self.adapter_bits_by_cut[(c, r)] for c, r in zip(cuts, held, strict=True)]
        adapter = np.array(bits, dtype=float) if self.trains_device else np.zeros(K)
        # a device that drops out mid-round (fewer batches than local steps) sends no adapter back
        finished = np.array([len(shapes[int(k)]) == self.config.train.local_steps for k in devices])
        adapter_up = np.where(finished, adapter, 0.0)
        if self.schedule == "parallel":  # fl: one stage, the adapter down, local training, the adapter up
            up = adapter_up[:, None, None]
            down = adapter[:, None]
            raw = adapter_up[:, None]
            compute = (work.forward_s + work.backward_s).sum(axis=1)[:, None]
            options, weight, server = np.array([32]), np.full(K, 1.0 / K), 0.0
        else:
            smashed, gradients, elements = self._smashed(shapes, devices, self.options)
            up, down = lockstep_stage_payloads(smashed, gradients, adapter, adapter_up)
            raw_smashed, _, _ = self._smashed(shapes, devices, np.array([32]))
            raw = lockstep_stage_payloads(raw_smashed, gradients, adapter, adapter_up)[0][:, :, 0]
            compute = lockstep_stage_compute(work.forward_s, work.backward_s)
            weight = elements / elements.sum() if elements.sum() > 0 else np.full(K, 1.0 / K)
            options, server = self.options, float(np.sum(work.server_s))
        return AllocationProblem(
            gain=work.gain, uplink_bits=up, downlink_bits=down, compute_s=compute, server_s=server,
            compute_energy_j=work.compute_energy_j, bits_options=options, raw_uplink_bits=raw,
            distortion_weight=weight, distortion_budget=self.budget, bandwidth_hz=sysc.bandwidth_hz,
            max_power_w=sysc.max_power_w, server_power_w=sysc.server_power_w,
            n0=noise_w_per_hz(sysc.noise_dbm_per_hz), lam=alloc.lam if lam is None else lam,
            deadline_s=alloc.deadline_s, max_latency_factor=alloc.max_latency_factor, energy_cap_j=alloc.energy_cap_j,
            subchannels=sysc.subchannels if sysc.access == "ofdma" and self.schedule != "sequential" else None)

    def plan(self, round_index: int, devices: np.ndarray, shapes: dict[int, list[BatchShape]]) -> RoundPlan:
        """The round's allocation and costs from each device's mini-batch shapes (`data.batch_shape`). A device
        listed with fewer mini-batches than local steps drops out after them: it computes and sends only those steps
        and no adapter, and is priced for just that."""
        devices = np.asarray(devices)
        cuts = self.joint_cuts(round_index, devices, shapes) if self.config.split.policy == "joint" else \
            self.cuts(devices)
        work = self.inputs(round_index, devices, shapes, cuts)
        if self.schedule == "sequential":
            return self._sequential(round_index, devices, shapes, work)
        problem = self.problem(round_index, devices, shapes, inputs=work, cuts=cuts)
        if self.schedule == "parallel":
            allocation = equal_allocation(problem, 32, reference_costs(problem))
            K, E = work.forward_s.shape
            zeros = np.zeros((K, E))
            phases = Phases(adapter_down=allocation.downlink_s[:, 0], forward=work.forward_s, uplink=zeros,
                            server=np.zeros(0), downlink=zeros, backward=work.backward_s,
                            adapter_up=allocation.uplink_s[:, 0])
            solo = phases.chains()
        else:
            ref = reference_costs(problem)
            # the allocator optimises the lockstep's stages: sfl-v2's queue at the server runs with equal shares
            if self.config.allocation.policy == "equal" or self.schedule == "server-sequential":
                allocation = equal_allocation(problem, self.config.quant.activation_bits, ref)
            else:
                allocation = allocate(problem, self.config.allocation.bits_search, reference=ref)
            phases = lockstep_phases(allocation.uplink_s, allocation.downlink_s, work.forward_s, work.backward_s,
                                     work.server_s)
            if self.schedule == "server-sequential":  # the allocation's times, the server's queue's finish times
                finish = finish_times(phases, self.schedule)
                allocation = dataclasses.replace(allocation, latency_s=finish, round_latency_s=float(finish.max()))
            # a device's speed, independent of the allocator's equalised stages: its bits at an equal share
            equal = equal_allocation(problem, allocation.bits, ref)
            solo = lockstep_phases(equal.uplink_s, equal.downlink_s, work.forward_s, work.backward_s,
                                   work.server_s).chains()
        self.last_cuts = tuple(cuts)
        return RoundPlan(devices=devices, allocation=allocation, samples=work.samples, phases=phases,
                         schedule=self.schedule, gain=work.gain, solo_s=solo,
                         classes=tuple(self.population.class_names(devices)), ranks=tuple(self.ranks(devices)),
                         cuts=tuple(cuts))

    def joint_cuts(self, round_index: int, devices: np.ndarray, shapes: dict[int, list[BatchShape]]) -> list[int]:
        """split.policy=joint: each device's cut from the candidates, chosen with its bits, power and bandwidth by
        `allocation.cuts.allocate_cuts` (the λ-objective; a cut over the device's memory budget never chosen).
        Each device's server share at a cut is its own samples through the blocks above it."""
        cands = list(self.config.split.candidates)
        K = len(devices)
        problems, server = [], np.zeros((K, len(cands)))
        for c, cut in enumerate(cands):
            at = [cut] * K
            work = self.inputs(round_index, devices, shapes, at)
            problems.append(self.problem(round_index, devices, shapes, inputs=work, cuts=at))
            table = self.table(cut)
            for i, k in enumerate(devices):
                server[i, c] = sum(shape.samples * sum(table.server(shape.padded)) for shape in shapes[int(k)])
        server /= self.config.system.server_flops
        assert self.population.device_class is not None  # joint requires device classes (config)
        budget = np.array([self.population.classes[int(c)].memory_mib
                           for c in self.population.device_class[np.asarray(devices, dtype=np.int64)]])
        memory = np.tile(np.array([self.memory_by_cut[cut] / 2**20 for cut in cands]), (K, 1))
        options = CutOptions(
            base=problems[0], cuts=np.array(cands), uplink_bits=np.stack([p.uplink_bits for p in problems], axis=1),
            downlink_bits=np.stack([p.downlink_bits for p in problems], axis=1),
            compute_s=np.stack([p.compute_s for p in problems], axis=1),
            compute_energy_j=np.stack([p.compute_energy_j for p in problems], axis=1),
            raw_uplink_bits=np.stack([p.raw_uplink_bits for p in problems], axis=1), server_s=server,
            memory_mib=memory, budget_mib=budget)
        search = "exhaustive" if self.config.allocation.bits_search == "exhaustive" and exhaustive_cuts_fit(options) \
            else "greedy"
        return [int(c) for c in allocate_cuts(options, search).cuts]

    def _sequential(self, round_index: int, devices: np.ndarray, shapes: dict[int, list[BatchShape]],
                    work: RoundInputs) -> RoundPlan:
        """sl: each device alone with the server on the whole band at full power, one after another."""
        cfg = self.config
        parts = []
        for i, k in enumerate(devices):
            one = RoundInputs(samples=work.samples[i:i + 1], forward_s=work.forward_s[i:i + 1],
                              backward_s=work.backward_s[i:i + 1], server_s=work.server_s[i],
                              compute_energy_j=work.compute_energy_j[i:i + 1], gain=work.gain[i:i + 1])
            problem = self.problem(round_index, devices[i:i + 1], {int(k): shapes[int(k)]}, inputs=one)
            parts.append(equal_allocation(problem, cfg.quant.activation_bits, reference_costs(problem)))
        up = np.concatenate([a.uplink_s for a in parts])
        down = np.concatenate([a.downlink_s for a in parts])
        phases = lockstep_phases(up, down, work.forward_s, work.backward_s, work.server_s)
        finish = np.cumsum(phases.chains())
        energy = np.concatenate([a.energy_j for a in parts])
        allocation = Allocation(
            bits=np.concatenate([a.bits for a in parts]),
            stage_power_w=np.concatenate([a.stage_power_w for a in parts]),
            stage_bandwidth_hz=np.concatenate([a.stage_bandwidth_hz for a in parts]), uplink_s=up, downlink_s=down,
            stage_s=np.sum([a.stage_s for a in parts], axis=0), latency_s=finish,
            uplink_energy_j=np.concatenate([a.uplink_energy_j for a in parts]), energy_j=energy,
            round_latency_s=float(finish[-1]), total_energy_j=float(energy.sum()), objective=float("nan"))
        return RoundPlan(devices=devices, allocation=allocation, samples=work.samples, phases=phases,
                         schedule=self.schedule, gain=work.gain, solo_s=phases.chains(),
                         classes=tuple(self.population.class_names(devices)), ranks=tuple(self.ranks(devices)))
