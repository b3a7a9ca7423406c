"""SFL-V2 (method sfl-v2): one server part trained over the round's devices one after another, device parts
averaged as in SFL-V1. Its schedule against an event-by-event simulation; its round against a hand computation on
two devices (docs/concepts/round-engine.md)."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
import torch

from sflam.platform.schedule import Phases, finish_times, latency
from tests.platform.test_schedule import random_phases


def simulate_server_sequential(p: Phases) -> np.ndarray:
    """Event by event: every device starts at once; the server takes device 0's steps, then device 1's, ...; a
    step is served when its smashed data has arrived and the server has finished the step before it."""
    K, E = p.forward.shape
    events: list[tuple[float, int, str, int]] = []
    for k in range(K):
        heapq.heappush(events, (float(p.adapter_down[k] + p.forward[k, 0] + p.uplink[k, 0]), k, "arrived", 0))
    waiting: set[tuple[int, int]] = set()
    turn, busy = (0, 0), False  # the (device, step) the server serves next; whether it is serving now
    finish = np.zeros(K)
    while events:
        now, k, what, e = heapq.heappop(events)
        if what == "arrived":
            waiting.add((k, e))
        elif what == "served":
            busy = False
            back = now + float(p.downlink[k, e] + p.backward[k, e])
            if e + 1 < E:
                heapq.heappush(events, (back + float(p.forward[k, e + 1] + p.uplink[k, e + 1]), k, "arrived", e + 1))
                turn = (k, e + 1)
            else:
                heapq.heappush(events, (back + float(p.adapter_up[k]), k, "done", e))
                turn = (k + 1, 0)
        else:
            finish[k] = now
        if not busy and turn in waiting:
            waiting.discard(turn)
            busy = True
            heapq.heappush(events, (now + float(p.server[turn]), turn[0], "served", turn[1]))
    return finish


@pytest.mark.parametrize("seed", range(20))
def test_server_sequential_makespan_equals_an_event_simulation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    phases = random_phases(int(rng.integers(1, 12)), int(rng.integers(1, 5)), seed, sequential=True)
    assert np.allclose(finish_times(phases, "server-sequential"), simulate_server_sequential(phases),
                       rtol=1e-9, atol=0)


def test_server_sequential_lies_between_the_lockstep_bound_and_sl() -> None:
    """The server's work is the same as sl's; the devices' own phases overlap, so the round is never longer than
    sl's; and the server alone needs the sum of its steps."""
    for seed in range(10):
        p = random_phases(6, 3, seed, sequential=True)
        v2 = latency(p, "server-sequential").round_s
        assert v2 <= latency(p, "sequential").round_s + 1e-12
        assert v2 >= float(p.server.sum()) - 1e-12
        # with instantaneous devices and radio, the round is the server's work alone
        zero = Phases(np.zeros(6), np.zeros((6, 3)), np.zeros((6, 3)), p.server, np.zeros((6, 3)),
                      np.zeros((6, 3)), np.zeros(6))
        assert latency(zero, "server-sequential").round_s == pytest.approx(float(p.server.sum()), rel=1e-12)


@pytest.mark.equality
def test_a_two_device_round_equals_a_hand_computation() -> None:
    """Two devices, two local steps, lossless messages, server LoRA trained: device 0's two steps update the server
    part, then device 1's two steps meet the updated server part; each device trains its own copy of the device
    adapter from the global one; the round's adapter is their sample-weighted mean."""
    from sflam.pipelines.baselines import ServerSequentialBackend
    from sflam.platform.assembly import Experiment
    from sflam.platform.data import collate, device_batches
    from sflam.platform.local import engine
    from sflam.platform.participation import select_devices
    from sflam.platform.strategies import weighted_average
    from tests.conftest import tiny_config
    from tests.equality import LOSSLESS, adamw_reach, assert_adamw_close

    config = tiny_config(*LOSSLESS, "train.devices_per_round=2", "train.local_steps=2", "lora.server=true",
                         "train.lr_schedule=constant", "allocation.policy=equal")
    exp = Experiment.build(config, schedule="server-sequential")
    hand = Experiment.build(config)  # an identical second copy for the computation by hand
    global_adapter = exp.device.initial_adapter()
    new_global, metrics = engine(exp, ServerSequentialBackend(exp)).run_round(0, global_adapter)

    server = hand.server.part
    trainable = [p for p in server.parameters() if p.requires_grad]
    assert trainable, "the server part must train for the order of devices to matter"
    server_opt = torch.optim.AdamW(trainable, lr=config.train.server_lr, weight_decay=0.0)
    adapters, weights, losses = [], [], []
    for k in select_devices(config.seed, 0, config.data.num_devices, 2):
        adapter = {n: t.clone().requires_grad_(True) for n, t in global_adapter.items()}
        device_opt = torch.optim.AdamW(adapter.values(), lr=config.train.device_lr, weight_decay=0.0)
        steps = device_batches(hand.data.shards[k], config.train.batch_size, 2, config.seed, 0, int(k))
        for idx in steps:
            batch = collate(hand.data.train, idx, hand.data.pad_token_id)
            hidden = torch.func.functional_call(hand.device.part, adapter, (batch.input_ids, batch.attention_mask),
                                                strict=False)
            sent = (hidden * batch.attention_mask[..., None]).detach().requires_grad_(True)
            loss, _ = server.loss_and_correct(server(sent, batch.attention_mask), batch.labels)
            server_opt.zero_grad()
            loss.backward()
            server_opt.step()  # this device's step moves the server part before the next step or device
            hidden.backward(sent.grad)
            device_opt.step()
            device_opt.zero_grad()
            losses.append(float(loss.detach()))
        adapters.append({n: t.detach() for n, t in adapter.items()})
        weights.append(float(sum(len(i) for i in steps)))

    assert metrics.step_losses == pytest.approx(losses, rel=1e-5)  # one server step per device and local step
    assert_adamw_close(new_global, weighted_average(adapters, weights), adamw_reach(config.train.device_lr, 2))
    state = exp.server.state()
    expected = {n: p.detach() for n, p in server.named_parameters() if p.requires_grad}
    assert_adamw_close(state, expected, adamw_reach(config.train.server_lr, 4), what="server part")


def test_each_device_trains_at_its_class_rank() -> None:
    """lora.rank_policy=by-class: each device's cohort of one starts at its class's rank (its RoundTask entry).
    Seen failing with the cohorts started without the ranks."""
    from sflam.pipelines.baselines import ServerSequentialBackend
    from sflam.platform.assembly import Experiment
    from sflam.platform.local import engine
    from tests.conftest import tiny_config
    from tests.platform.test_costs import RANKED

    config = tiny_config(*RANKED, "train.devices_per_round=4", "allocation.policy=equal")
    exp = Experiment.build(config, schedule="server-sequential")
    started: list[tuple[list[int], list[int] | None]] = []
    start = exp.device.start

    def recording(devices, adapter, lr_factor=1.0, fit=None, ranks=None):  # type: ignore[no-untyped-def]
        started.append((list(devices), ranks))
        return start(devices, adapter, lr_factor, fit, ranks)

    exp.device.start = recording  # type: ignore[method-assign]
    engine(exp, ServerSequentialBackend(exp)).run_round(0, exp.device.initial_adapter())
    assert len(started) == 4
    assert [ranks for _, ranks in started] == [exp.planner.ranks(np.array(devices)) for devices, _ in started]
    assert len({ranks[0] for _, ranks in started if ranks}) >= 2  # this seed's four devices have mixed ranks
