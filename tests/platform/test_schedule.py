"""The round's schedule: the vectorised makespan against an event-by-event simulation
(docs/concepts/system-model.md)."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from sflam.platform.schedule import (
    Phases,
    finish_times,
    latency,
    lockstep_phases,
    lockstep_stage_compute,
    lockstep_stage_payloads,
    makespan,
)


def random_phases(K: int, E: int, seed: int, sequential: bool = False) -> Phases:
    """Phase times spread over orders of magnitude, so that devices' slowest phases differ."""
    rng = np.random.default_rng(seed)

    def draw(*shape: int) -> np.ndarray:
        return 10.0 ** rng.uniform(-3, 0, shape)

    return Phases(adapter_down=draw(K), forward=draw(K, E), uplink=draw(K, E),
                  server=draw(K, E) if sequential else draw(E), downlink=draw(K, E), backward=draw(K, E),
                  adapter_up=draw(K))


def simulate_lockstep(p: Phases) -> np.ndarray:
    """Event by event: each device runs its phases in order; the server's step e starts when the last smashed
    data of step e arrives; a device's gradient download starts when the server's step ends."""
    K, E = p.forward.shape
    events: list[tuple[float, int, str, int]] = []  # (time, device, what finished, step)
    for k in range(K):
        heapq.heappush(events, (float(p.adapter_down[k] + p.forward[k, 0] + p.uplink[k, 0]), k, "arrived", 0))
    arrived: list[list[int]] = [[] for _ in range(E)]
    finish = np.zeros(K)
    while events:
        now, k, what, e = heapq.heappop(events)
        if what == "arrived":
            arrived[e].append(k)
            if len(arrived[e]) == K:  # the server step starts with the last arrival
                heapq.heappush(events, (now + float(p.server[e]), -1, "served", e))
        elif what == "served":
            for j in range(K):
                back = now + float(p.downlink[j, e] + p.backward[j, e])
                if e + 1 < E:
                    heapq.heappush(events, (back + float(p.forward[j, e + 1] + p.uplink[j, e + 1]), j, "arrived",
                                            e + 1))
                else:
                    heapq.heappush(events, (back + float(p.adapter_up[j]), j, "done", e))
        else:
            finish[k] = now
    return finish


def simulate_sequential(p: Phases) -> np.ndarray:
    K, E = p.forward.shape
    now, finish = 0.0, np.zeros(K)
    for k in range(K):
        now += float(p.adapter_down[k])
        for e in range(E):
            for phase in (p.forward[k, e], p.uplink[k, e], p.server[k, e], p.downlink[k, e], p.backward[k, e]):
                now += float(phase)
        now += float(p.adapter_up[k])
        finish[k] = now
    return finish


@pytest.mark.parametrize("seed", range(20))
def test_lockstep_makespan_equals_an_event_simulation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    phases = random_phases(int(rng.integers(1, 30)), int(rng.integers(1, 6)), seed)
    simulated = simulate_lockstep(phases)
    assert np.allclose(finish_times(phases, "lockstep"), simulated, rtol=1e-9, atol=0)
    assert makespan(phases, "lockstep") == pytest.approx(float(simulated.max()), rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_sequential_and_parallel_makespans(seed: int) -> None:
    phases = random_phases(7, 3, seed, sequential=True)
    assert np.allclose(finish_times(phases, "sequential"), simulate_sequential(phases), rtol=1e-9, atol=0)
    parallel = Phases(phases.adapter_down, phases.forward, np.zeros((7, 3)), np.zeros(0), np.zeros((7, 3)),
                      phases.backward, phases.adapter_up)
    alone = phases.adapter_down + phases.adapter_up + (phases.forward + phases.backward).sum(axis=1)
    assert makespan(parallel, "parallel") == pytest.approx(float(alone.max()), rel=1e-12)


def test_the_barriers_cost_time_when_the_slowest_phase_moves_between_devices() -> None:
    """Device 0 is slow to compute in step 1, device 1 slow to transmit in step 2: a per-device sum (max of
    chains) misses that the lockstep waits for each of them in turn."""
    p = Phases(adapter_down=np.zeros(2), forward=np.array([[1.0, 0.0], [0.0, 0.0]]),
               uplink=np.array([[0.0, 0.0], [0.0, 1.0]]), server=np.zeros(2), downlink=np.zeros((2, 2)),
               backward=np.zeros((2, 2)), adapter_up=np.zeros(2))
    assert float(np.max(p.chains())) == pytest.approx(1.0)
    assert makespan(p, "lockstep") == pytest.approx(2.0)


def test_communication_latency_is_what_the_radio_adds() -> None:
    phases = random_phases(9, 3, 0)
    lat = latency(phases, "lockstep")
    assert lat.comm_s + lat.compute_s == pytest.approx(lat.round_s)
    assert lat.compute_s == pytest.approx(makespan(phases.without_radio(), "lockstep"))
    assert 0 < lat.comm_s < lat.round_s
    silent = latency(phases.without_radio(), "lockstep")
    assert silent.comm_s == 0.0


def test_lockstep_stages_carry_each_steps_payloads_and_computation() -> None:
    """The allocator's view of a lockstep round (E local steps, E + 1 stages), by hand for two devices: stage 0
    downloads the adapter and uploads step 1's smashed data; stage e downloads step e's gradient and uploads step
    e + 1's; the last downloads the last gradient and uploads the adapter. Device computation: forward 1, then
    backward e + forward e + 1, then the last backward. Stage times map back onto the round's phases."""
    smashed = np.array([[[10.0, 20.0], [11.0, 21.0]], [[30.0, 40.0], [31.0, 41.0]]])  # (K=2, E=2, Q=2 options)
    up, down = lockstep_stage_payloads(smashed, np.array([[5.0, 6.0], [7.0, 8.0]]), np.array([100.0, 200.0]),
                                       np.array([300.0, 400.0]))
    assert up.tolist() == [[[10, 20], [11, 21], [300, 300]], [[30, 40], [31, 41], [400, 400]]]
    assert down.tolist() == [[100, 5, 6], [200, 7, 8]]
    forward, backward = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), np.array([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    assert lockstep_stage_compute(forward, backward).tolist() == [[1, 12, 23, 30], [4, 45, 56, 60]]
    uplink_s = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    downlink_s = np.array([[1.1, 1.2, 1.3, 1.4], [1.5, 1.6, 1.7, 1.8]])
    phases = lockstep_phases(uplink_s, downlink_s, forward, backward, np.array([0.01, 0.02, 0.03]))
    assert phases.adapter_down.tolist() == [1.1, 1.5] and phases.adapter_up.tolist() == [0.4, 0.8]
    assert phases.uplink.tolist() == [[0.1, 0.2, 0.3], [0.5, 0.6, 0.7]]
    assert phases.downlink.tolist() == [[1.2, 1.3, 1.4], [1.6, 1.7, 1.8]]
