"""The round's schedule: the vectorised makespan against an event-by-event simulation
(docs/concepts/system-model.md)."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from sflam.platform.schedule import Phases, finish_times, latency, makespan


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
