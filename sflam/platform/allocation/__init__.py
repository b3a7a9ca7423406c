"""Joint allocation of activation bits, transmit power and bandwidth per device in a round (docs/concepts/allocator.md).

    minimise  lam * T / T0 + (1 - lam) * E / E0
    over      q_k in Q, p_kj in [0, P_max], b_kj >= 0,   sum_k b_kj <= B in every stage j,
              sum_k w_k D(q_k) <= eps,  optional per-device energy caps,  T <= T_max,

with T the makespan of the lockstep round the runtime executes (docs/concepts/round-engine.md,
docs/concepts/system-model.md) and E the devices'
energy; T0, E0 are the values of the equal allocation at fp32 (b = B/K, P_max, q = 32), so lam is
unit-free.

The lockstep round is a chain of J = E + 1 stages separated by the server's barriers: stage 0 is the
adapter download, the first forward and the first uplink; stage e is the gradient download of step e,
the backward, the next forward and its uplink; the last stage is the last gradient download, the last
backward and the adapter upload. A stage lasts as long as its slowest device, so

    T = sum_j max_k (c_kj + D_kj(b_kj) + tau_kj) + server time,

a sum of maxima of convex functions of (tau, b). The base station assigns each stage's transmissions
their own bandwidth share and power (as it re-assigns resource blocks every scheduling interval), so
for fixed bits the block separates into one convex problem per stage, coupled only through a round
deadline (a latency price eta found by bisection). Each stage is solved exactly: the uplink energy
tau (N0 b / g)(2^(S / (tau b)) - 1) is jointly convex in (tau, b), the power cap is
tau >= S / (b log2(1 + P_max g / (N0 b))), the downlink time at server power is convex decreasing in b.
Energy falls with time, so every device uses its whole slack: tau_kj = m_j - c_kj - D_kj(b_kj). For a
stage length m the problem is a separable convex resource allocation over b, solved through its
bandwidth price nu (each device: e_k'(b_k) = -nu; sum b_k = B) by Newton's method on the whole KKT system
(its Jacobian is arrow-shaped: a step is one pass over the devices), with nested bracketed roots as the
fallback; the optimal value is convex in m and its slope (envelope theorem) is driven to zero by secant
steps and Illinois false position, warm-started from the last solution. Each device's least bandwidth at
full power is a per-device Newton root inside a shrinking bracket. The per-device loops are compiled
(`kernels`, numba). The bits block alternates with it (block coordinate descent): given the
stages' (b, m), each device's uplink energy at each bit width is known; a Lagrangian price on distortion
picks the bits, a greedy pass (a heap of each device's best move) spends what budget is left, and the
block is kept when the objective falls.

Modules: `problem` (the problem and its solution), `links` (one stage's link physics), `stage` (one stage solved
exactly), `kernels` (its compiled per-device loops), `block` (all stages for fixed bits, under a deadline; the
equal allocation), `ofdma` (whole subchannels by matching), `bits` (the bits block and the joint allocation),
`cuts` (each device's cut chosen with its bits under its memory budget; the `memory` cut policy).
"""

from sflam.platform.allocation.bits import allocate, exhaustive_fits
from sflam.platform.allocation.block import equal_allocation, reference_costs, solve_power_bandwidth
from sflam.platform.allocation.problem import MAX_X, Allocation, AllocationError, AllocationProblem, distortion

__all__ = ["MAX_X", "Allocation", "AllocationError", "AllocationProblem", "allocate", "distortion",
           "equal_allocation", "exhaustive_fits", "reference_costs", "solve_power_bandwidth"]
