"""The round's schedule (docs/concepts/system-model.md): per-device phase times -> the makespan the runtime executes.

A round is a set of phases per device: the adapter download, then per local step a forward, the
smashed-data uplink, the server's step, the gradient download and a backward, and at the end the
adapter upload. Three schedules execute them:

- lockstep (sfl, sfl-q, sflam: SFL-V1 with server-side batching): the server starts step e only when
  every device's smashed data of step e has arrived, and a device starts its next forward only after
  its gradient came back and its backward ran. With S_e the server's finish time of step e,
      S_1     = max_k (a_k + f_k1 + u_k1) + s_1
      S_{e+1} = S_e + max_k (d_ke + w_ke + f_k,e+1 + u_k,e+1) + s_{e+1}
  and the round ends with the last backward and adapter upload: T = S_E + max_k (d_kE + w_kE + z_k).
- sequential (sl): one device after another, each alone with the server; T = sum of their chains.
- server-sequential (sfl-v2): the devices compute and transmit in parallel, but the one server part serves
  them one at a time in the round's device order, all of a device's steps before the next device's. With F
  the time the server becomes free and A_ke the arrival of device k's smashed data of step e,
      A_k1    = a_k + f_k1 + u_k1,      start_ke = max(A_ke, F),      F = start_ke + s_ke,
      A_k,e+1 = F + d_ke + w_ke + f_k,e+1 + u_k,e+1
  and device k finishes at F_kE + d_kE + w_kE + z_k (the server turns to the next device meanwhile).
- parallel (fl): every device trains alone (no smashed data, no server), T = max_k of its chain.

Communication latency is defined once for every schedule: the time the radio adds to the round, i.e.
the makespan minus the makespan of the same schedule with every transmission instantaneous; the
computation latency is that second makespan, so the two add up to the round latency.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

SCHEDULES = ("lockstep", "sequential", "server-sequential", "parallel")


@dataclass(frozen=True)
class Phases:
    """Phase durations (seconds) of one round: K devices, E local steps.

    `server` is (E,) for the lockstep (one step over every device's micro-batch) and (K, E) for the
    sequential and server-sequential schedules (the server's step over one device's micro-batch); the
    parallel schedule has none.
    """

    adapter_down: np.ndarray  # (K,)
    forward: np.ndarray       # (K, E)
    uplink: np.ndarray        # (K, E)
    server: np.ndarray        # (E,) or (K, E)
    downlink: np.ndarray      # (K, E)
    backward: np.ndarray      # (K, E)
    adapter_up: np.ndarray    # (K,)

    def without_radio(self) -> Phases:
        """The same round with every transmission instantaneous."""
        return dataclasses.replace(self, adapter_down=np.zeros_like(self.adapter_down),
                                   uplink=np.zeros_like(self.uplink), downlink=np.zeros_like(self.downlink),
                                   adapter_up=np.zeros_like(self.adapter_up))

    def lockstep_stages(self) -> np.ndarray:
        """(K, E + 1): each device's busy time between the server's barriers."""
        K, E = self.forward.shape
        stages = np.empty((K, E + 1))
        stages[:, 0] = self.adapter_down + self.forward[:, 0] + self.uplink[:, 0]
        stages[:, 1:E] = self.downlink[:, :-1] + self.backward[:, :-1] + self.forward[:, 1:] + self.uplink[:, 1:]
        stages[:, E] = self.downlink[:, -1] + self.backward[:, -1] + self.adapter_up
        return stages

    def chains(self) -> np.ndarray:
        """(K,): each device's own chain of phases, as if it were alone (server steps included)."""
        server = np.broadcast_to(self.server, self.forward.shape) if self.server.size else 0.0
        return (self.adapter_down + self.adapter_up
                + np.sum(self.forward + self.uplink + server + self.downlink + self.backward, axis=1))


def finish_times(phases: Phases, schedule: str) -> np.ndarray:
    """(K,): when each device's adapter upload completes."""
    if schedule == "lockstep":
        stages = phases.lockstep_stages()
        barrier = float(stages[:, :-1].max(axis=0).sum() + np.sum(phases.server))
        return barrier + stages[:, -1]
    if schedule == "sequential":
        return np.cumsum(phases.chains())
    if schedule == "server-sequential":
        return _server_sequential_finish(phases)
    if schedule == "parallel":
        return phases.chains()
    raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


def _server_sequential_finish(phases: Phases) -> np.ndarray:
    """Device k's finish time when the server serves the devices one after another, each device's steps in turn."""
    K, E = phases.forward.shape
    finish = np.empty(K)
    free = 0.0  # when the server is free for the next device's step
    for k in range(K):
        arrival = phases.adapter_down[k] + phases.forward[k, 0] + phases.uplink[k, 0]
        for e in range(E):
            free = max(arrival, free) + phases.server[k, e]
            back = free + phases.downlink[k, e] + phases.backward[k, e]
            arrival = back + (phases.forward[k, e + 1] + phases.uplink[k, e + 1] if e + 1 < E else 0.0)
        finish[k] = back + phases.adapter_up[k]
    return finish


def makespan(phases: Phases, schedule: str) -> float:
    """The round latency: when the last device's adapter upload completes."""
    return float(np.max(finish_times(phases, schedule)))


@dataclass(frozen=True)
class Latency:
    """A round's latency and its two parts (communication + computation = round)."""

    round_s: float
    comm_s: float
    compute_s: float


def latency(phases: Phases, schedule: str) -> Latency:
    total = makespan(phases, schedule)
    compute = makespan(phases.without_radio(), schedule)
    return Latency(total, total - compute, compute)


# --------------------------------------------------------------------------- stages for the allocator


def lockstep_stage_payloads(smashed_bits: np.ndarray, gradient_bits: np.ndarray, adapter_down_bits: np.ndarray,
                            adapter_up_bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-stage uplink (K, E + 1, Q) and downlink (K, E + 1) payloads of the lockstep.

    smashed_bits (K, E, Q) are the smashed data of each step at each bit option; gradient_bits (K, E)
    the encoded gradients. Stage 0 downloads the adapter and uploads step 1; stage e downloads the
    gradient of step e and uploads step e + 1; the last stage uploads the adapter.
    """
    K, E, Q = smashed_bits.shape
    up = np.zeros((K, E + 1, Q))
    up[:, :E, :] = smashed_bits
    up[:, E, :] = np.asarray(adapter_up_bits, dtype=np.float64)[:, None]
    down = np.zeros((K, E + 1))
    down[:, 0] = adapter_down_bits
    down[:, 1:] = gradient_bits
    return up, down


def lockstep_stage_compute(forward_s: np.ndarray, backward_s: np.ndarray) -> np.ndarray:
    """(K, E + 1): device computation in each stage: forward 1; backward e + forward e + 1; the last backward."""
    K, E = forward_s.shape
    compute = np.zeros((K, E + 1))
    compute[:, 0] = forward_s[:, 0]
    compute[:, 1:E] = backward_s[:, :-1] + forward_s[:, 1:]
    compute[:, E] = backward_s[:, -1]
    return compute


def lockstep_phases(uplink_s: np.ndarray, downlink_s: np.ndarray, forward_s: np.ndarray, backward_s: np.ndarray,
                    server_s: np.ndarray) -> Phases:
    """The phases of a lockstep plan whose per-stage times are uplink_s, downlink_s (K, E + 1)."""
    return Phases(adapter_down=downlink_s[:, 0], forward=forward_s, uplink=uplink_s[:, :-1], server=server_s,
                  downlink=downlink_s[:, 1:], backward=backward_s, adapter_up=uplink_s[:, -1])
