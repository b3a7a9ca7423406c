"""Devices at several cuts (split.policy memory | joint): the config's refusals, the parts built once for every cut,
the cohort batched across cuts, a heterogeneous round against one composed by hand, each cut priced as a run at
that cut, and the two policies' cuts within every memory budget
(docs/concepts/split-and-codec.md#devices-at-different-cuts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sflam.pipelines.baselines import method_config
from sflam.platform.assembly import Experiment, merge_server_copies
from sflam.platform.data import collate
from sflam.platform.errors import ConfigError
from sflam.platform.local import engine
from sflam.platform.participation import round_shapes
from sflam.platform.split import block_of, overlap_names
from sflam.platform.strategies import Adapter
from tests.conftest import tiny_config
from tests.equality import adamw_reach, assert_adamw_close, assert_determined

TWO = ("devices.classes=[{name: small, share: 0.5, memory_mib: %s, clock_hz: [1.0e9, 1.0e9]},"
       "{name: big, share: 0.5, memory_mib: 100000, clock_hz: [2.0e9, 2.0e9]}]")


def mixed(policy: str = "memory", small_mib: float = 100000, *overrides: str) -> Experiment:
    """tiny-llama (4 blocks) with two classes and candidate cuts 1 and 2 (unless overridden)."""
    return Experiment.build(tiny_config(TWO % small_mib, f"split.policy={policy}", "split.candidates=[1,2]",
                                        *overrides))


def peaks(candidates: str = "[1,2]") -> dict[int, int]:
    return mixed("memory", 100000, f"split.candidates={candidates}").planner.memory_by_cut


def three_classes(*base: str) -> tuple[str, ...]:
    """Three classes whose budgets hold cuts 1, 2 and 3 of tiny-llama at most, at LoRA ranks 2, 4 and 8, memory
    policy: every device at its class's cut and rank (the peaks measured with the `base` overrides)."""
    peak = {c: p / 2**20 for c, p in mixed("memory", 100000, "split.candidates=[1,2,3]", *base)
            .planner.memory_by_cut.items()}
    return ("split.policy=memory", "split.candidates=[1,2,3]", "lora.rank_policy=by-class", "devices.classes=["
            f"{{name: small, share: 0.4, memory_mib: {peak[2] - 0.01}, clock_hz: [1e9, 1e9], lora_rank: 2}},"
            f"{{name: mid, share: 0.3, memory_mib: {peak[3] - 0.01}, clock_hz: [1e9, 1e9], lora_rank: 4}},"
            f"{{name: large, share: 0.3, memory_mib: {peak[3] + 1}, clock_hz: [2e9, 2e9], lora_rank: 8}}]")


# --------------------------------------------------------------------------- the config


def test_fixed_ignores_the_candidates() -> None:
    """A config with candidates switches to the fixed policy by override: every device at cut_layer."""
    exp = Experiment.build(tiny_config(TWO % 9, "split.candidates=[1,2]", "split.cut_layer=2"))
    assert exp.device.part.cut_layer == exp.server.part.cut_layer == 2 and not exp.planner.flops_by_cut
    assert engine(exp).configure(0)[0].cuts == []


def test_a_candidate_beyond_the_model_is_refused_before_any_weights_load(monkeypatch) -> None:
    from sflam.platform import build

    monkeypatch.setattr(build, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=r"split.candidates=\[1, 5\] is invalid: cuts in 0..4 for tiny-llama"):
        Experiment.build(tiny_config(TWO % 9, "split.policy=memory", "split.candidates=[1,5]"))


@pytest.mark.parametrize("method", ["fl", "sl", "sfl-v2"])
def test_methods_priced_at_one_cut_refuse_several(method: str) -> None:
    config = tiny_config(TWO % 9, "split.policy=memory", "split.candidates=[1,2]")
    with pytest.raises(ConfigError, match=f"split.policy='memory' is invalid: fixed with method {method}"):
        method_config(config, method)
    for other in ("sfl", "sfl-q", "sflam"):
        assert method_config(config, other).split.candidates == [1, 2]


# --------------------------------------------------------------------------- the parts


def test_one_device_part_at_the_deepest_cut_serves_every_cut() -> None:
    """The device part is cut at the deepest candidate from a copy of the model, the server part at the shallowest
    from the model itself; the LoRA of the blocks in both start equal, so at the start every cut's deployed
    pipeline gives the same logits (fp32 weights: the split is exact whatever the cut). Seen failing with the tie
    of the overlapping LoRA removed from build_parts (B drawn non-zero below)."""
    exp = mixed()
    device, server = exp.device.part, exp.server.part
    assert (device.cut_layer, server.cut_layer) == (2, 1)
    pairs = overlap_names(device, server)
    assert pairs and all(block_of(d) == 1 and s.startswith("layers.0.") for d, s in pairs)
    dparams, sparams = dict(device.named_parameters()), dict(server.named_parameters())
    assert all(torch.equal(dparams[d], sparams[s]) for d, s in pairs)
    # the device part's blocks are its own (a copy): training the device never touches the server's weights
    assert device.layers[1].self_attn.q_proj.base_layer.weight.data_ptr() != \
        server.layers[0].self_attn.q_proj.base_layer.weight.data_ptr()
    # make every LoRA count: the same non-zero B on both copies of block 1, another on block 0
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in dparams.items():
            if "lora_B" in name:
                p.normal_(std=0.1)
        for d, s in pairs:
            sparams[s].copy_(dparams[d])
    batch = collate(exp.data.test, np.arange(6), exp.data.pad_token_id)
    with torch.no_grad():
        logits = {}
        for cut in (1, 2):
            at = device.at(cut)
            assert at.cut_layer == cut and len(at.layers) == cut and at.layers[0] is device.layers[0]
            hidden = at(batch.input_ids, batch.attention_mask)
            logits[cut] = server(hidden, batch.attention_mask, server.start_of(cut))
    assert torch.allclose(logits[1], logits[2], atol=1e-5, rtol=0)
    assert device.at(2) is device and server.at(1) is server
    assert len(server.at(2).layers) == len(server.layers) - 1 and server.at(2).layers[0] is server.layers[1]


# --------------------------------------------------------------------------- the cohort across cuts


def test_the_cohort_batched_across_cuts_equals_each_device_alone() -> None:
    """Devices at cuts 1 and 2 of one sequence length in one cohort: every device's smashed data and, after a
    backward and an optimizer step, its adapter equal the device run alone at its cut; the block a device does not
    hold is left at the global value. Seen failing with the chunks grouped by length only."""
    exp = mixed()
    runner = exp.device
    adapter = runner.initial_adapter()
    devices, cuts = [0, 1, 2, 3], [1, 2, 2, 1]
    batches = [collate(exp.data.train, np.arange(8 * i, 8 * i + 8), exp.data.pad_token_id) for i in range(4)]
    torch.manual_seed(5)
    gradients = None

    def step(members: list[int]):
        group = runner.start([devices[i] for i in members], adapter, cuts=[cuts[i] for i in members])
        sent = runner.forward(group, list(range(len(members))), [batches[i] for i in members], 0, 0,
                              [0] * len(members))
        if gradients is not None:
            runner.backward(group, 0, [gradients[i] for i in members])
        return sent, group

    from sflam.platform import codec

    first, _ = step([0, 1, 2, 3])
    assert [m.cut for m in first] == cuts
    torch.manual_seed(6)
    gradients = [codec.encode(torch.randn(m.activations.shape), 32) for m in first]
    together, group = step([0, 1, 2, 3])
    for i in range(4):
        alone, one = step([i])
        # the forward: determined up to rounding; the adapters after an AdamW step: within its reach on any host
        # (AdamW divides by the gradient's magnitude, so another kernel's rounding of a tiny gradient moves an
        # element by up to lr; tests/equality.py)
        assert_determined(codec.decode(alone[0].activations), codec.decode(together[i].activations), f"device {i}")
        mine, theirs = one.adapter_of(0), group.adapter_of(i)
        assert_adamw_close(mine, theirs, adamw_reach(runner.lr, 1), f"device {i}")
        for name, value in mine.items():
            if block_of(name) is not None and block_of(name) >= cuts[i]:
                assert torch.equal(value, adapter[name].cpu()), name  # a block below no device's cut: untouched


# --------------------------------------------------------------------------- a round against one by hand


def test_a_heterogeneous_round_equals_one_composed_by_hand() -> None:
    """One round of the engine with devices at cuts 1 and 2 against the same round composed by hand from its
    pieces: each device alone at its cut, one server step over every message per local step, each block averaged
    over the devices that hold it, then the block between the cuts merged with the server's copy by the weights of
    the devices each copy stands for. Seen failing with the per-block weights replaced by the round's total and
    with the merge removed."""
    config = tiny_config(TWO % (peaks()[2] / 2**20 - 0.01), "split.policy=memory", "split.candidates=[1,2]",
                         "train.devices_per_round=6")
    run, by_hand = Experiment.build(config), Experiment.build(config)
    eng = engine(run)
    task, plan, _ = eng.configure(0)
    assert plan is not None and sorted(set(task.cuts)) == [1, 2]  # both cuts in the round
    start = run.device.initial_adapter()
    new_global, _ = eng.run_round(0, start)

    # ---- by hand
    data = by_hand.data
    groups = [by_hand.device.start([int(k)], start, task.lr_factor, task.fit, None, [c])
              for k, c in zip(task.devices, task.cuts, strict=True)]
    by_hand.server.set_lr_factor(task.lr_factor)
    for e in range(task.local_steps):
        messages = []
        for i, k in enumerate(task.devices):
            batch = collate(data.train, task.indices[int(k)][e], data.pad_token_id)
            messages += by_hand.device.forward(groups[i], [0], [batch], 0, e, [task.bits[i]])
        result = by_hand.server.step(messages, 0, e)
        for i, group in enumerate(groups):
            by_hand.device.backward(group, e, [result.gradients[i]])
    expected: Adapter = {}
    for name, value in start.items():
        held = [i for i, c in enumerate(task.cuts) if block_of(name) is None or block_of(name) < c]
        total = sum(task.weights[i] for i in held)
        expected[name] = (sum(task.weights[i] * groups[i].adapter_of(0)[name].double() for i in held) / total
                          ).float() if total else value
    server = dict(by_hand.server.part.named_parameters())
    for d, s in overlap_names(by_hand.device.part, by_hand.server.part):
        below = sum(w for w, c in zip(task.weights, task.cuts, strict=True) if c > 1)
        above = sum(w for w, c in zip(task.weights, task.cuts, strict=True) if c <= 1)
        expected[d] = ((below * expected[d].double() + above * server[s].detach().double()) / (below + above)).float()
    # averages and merges of tensors after AdamW steps: within the steps' reach on any host (tests/equality.py)
    reach = adamw_reach(max(config.train.device_lr, config.train.server_lr), task.local_steps)
    assert_adamw_close(new_global, expected, reach, "global adapter")
    ran = dict(run.server.part.named_parameters())
    for d, s in overlap_names(run.device.part, run.server.part):
        assert torch.equal(ran[s], new_global[d])  # one global copy: the server holds it too


def test_the_merge_weighs_each_copy_by_the_devices_it_stands_for() -> None:
    exp = mixed()
    device, server = exp.device.part, exp.server.part
    pairs = overlap_names(device, server)
    sparams = dict(server.named_parameters())
    adapter = {n: torch.full_like(t, 1.0) for n, t in exp.device.initial_adapter().items()}
    with torch.no_grad():
        for _, s in pairs:
            sparams[s].fill_(4.0)
    merged = merge_server_copies(pairs, server, adapter, cuts=[2, 1, 1, 2], weights=[1.0, 2.0, 0.0, 3.0])
    for d, s in pairs:  # devices at cut 2 (weights 1 + 3) hold block 1, the server stood for the cut-1 one (2)
        assert torch.allclose(merged[d], torch.full_like(merged[d], (4 * 1.0 + 2 * 4.0) / 6))
        assert torch.equal(sparams[s], merged[d])
    assert set(merged) == {d for d, _ in pairs}  # the other blocks are the caller's (the devices' average)


# --------------------------------------------------------------------------- priced per cut


def test_each_cut_is_priced_as_a_run_at_that_cut() -> None:
    """A device at cut c pays the FLOPs, memory and adapter payload of a run with every device at c. Seen failing
    with the per-cut FLOP table replaced by the deepest cut's."""
    exp = mixed()
    shape = round_shapes(exp.data, {0: [np.arange(8)]})[0][0]
    for cut in (1, 2):
        fixed = Experiment.build(tiny_config(f"split.cut_layer={cut}"))
        table = exp.planner.table(cut)
        assert table.device_batch(shape) == fixed.planner.flops.device_batch(shape)
        assert table.server(shape.padded) == fixed.planner.flops.server(shape.padded)
        assert exp.planner.adapter_bits_by_cut[(cut, None)] == fixed.planner.adapter_bits
        assert exp.planner.memory_by_cut[cut] == fixed.memory.total
    assert exp.planner.table(1).device_batch(shape)[0] < exp.planner.table(2).device_batch(shape)[0]


# --------------------------------------------------------------------------- the policies


def test_memory_gives_each_class_the_deepest_cut_its_budget_holds() -> None:
    """Seen failing with the shallowest fitting cut taken instead."""
    peak = peaks()
    exp = mixed("memory", peak[2] / 2**20 - 0.01)  # the small class holds cut 1 only
    assert exp.planner.class_cuts == {"small": 1, "big": 2}
    result = engine(exp).run()
    for metrics in result.rounds:
        plan = metrics.plan
        for row, name, cut in zip(plan.table(), plan.classes, plan.cuts, strict=True):
            assert row["cut"] == cut == {"small": 1, "big": 2}[name]
    fleet = result.fleet()
    assert fleet["device_classes"]["small"]["cut"] == 1 and fleet["device_classes"]["small"]["cuts_fitting"] == [1]
    assert fleet["devices_over_memory"] == 0
    with pytest.raises(ConfigError, match=r"devices.classes\[small\].memory_mib=1.0 is invalid: at least [0-9.]+ MiB "
                                          r"\(the measured device-part peak at the shallowest candidate cut 1\)"):
        mixed("memory", 1)


def test_joint_never_gives_a_device_a_cut_over_its_budget() -> None:
    """Every round's cuts from the joint allocator; the small class's budget holds cut 1 only. Seen failing with
    the memory budgets left out of the allocator's options (every budget infinite)."""
    peak = peaks()
    # a slow server (1 GFLOP/s) and latency only: the deeper cut pays, where a budget allows it
    exp = mixed("joint", peak[2] / 2**20 - 0.01, "train.rounds=2", "allocation.lam=1.0", "system.server_flops=1e9")
    result = engine(exp).run()
    seen = set()
    for metrics in result.rounds:
        plan = metrics.plan
        for name, cut in zip(plan.classes, plan.cuts, strict=True):
            assert exp.planner.memory_by_cut[cut] <= {"small": peak[2] - 0.01 * 2**20, "big": 1e12}[name]
            seen.add((name, cut))
    assert ("small", 2) not in seen and ("big", 2) in seen
    assert "cut" not in result.fleet()["device_classes"]["small"]
