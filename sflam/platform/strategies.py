"""Aggregation strategies: how a round's device adapters become the next global adapter (docs/concepts/round-engine.md).

In the spirit of Flower's Strategy: a small class per rule with two hooks, `configure_fit` (what the
devices are told for local training: a proximal term, frozen LoRA factors) and `aggregate` (the new
global adapter from the round's weighted average), plus its own state for checkpoints. The maths are
module-level functions over tensors, testable by hand.

fedavg    the average of the devices' adapters weighted by `aggregation.weights` (McMahan et al. 2017)
fedprox   FedAvg with a proximal term mu/2 ||w - w_global||^2 in every device's local objective (Li et al. 2020)
fedadam   a server Adam step on the pseudo-gradient (average - global) (Reddi et al. 2021, Algorithm 2)
fedyogi   the same with Yogi's additive second moment (Reddi et al. 2021)
ffa-lora  LoRA's A factors frozen at their shared initialisation, only B trained and averaged, so the
          average of the products B_k A equals the product of the averages exactly (Sun et al. 2024, FFA-LoRA)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sflam.platform.config import AGGREGATION_STRATEGIES, ExperimentConfig

Adapter = dict[str, torch.Tensor]  # named trained tensors: a device adapter, or the server part's trained state
FROZEN_LORA_A = ("lora_A",)


def trainable_state(module: torch.nn.Module) -> Adapter:
    """Detached fp32 copies of a module's trainable tensors (adapters, and a new head)."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class FitInstructions:
    """What every device of a round is told for its local steps (decided on the driver)."""

    proximal_mu: float = 0.0
    frozen: tuple[str, ...] = ()  # adapter tensors whose name contains one of these stay fixed

    def is_frozen(self, name: str) -> bool:
        return any(part in name for part in self.frozen)


# --------------------------------------------------------------------------- the maths


def weighted_sum(adapters: list[Adapter], weights: list[float]) -> Adapter:
    """Sum of adapters weighted by the strategy's weights (one process's share of an average), accumulated in
    float64: however the devices are grouped into partial sums, the fp32 average comes out the same."""
    if not adapters or not adapters[0]:
        return {}
    return {name: torch.stack([w * a[name].double() for a, w in zip(adapters, weights, strict=True)]).sum(0)
            for name in adapters[0]}


def weighted_average(adapters: list[Adapter], weights: list[float]) -> Adapter:
    """The weighted mean of adapters (FedAvg), in the adapters' dtype."""
    total = float(sum(weights))
    return {name: (t / total).to(adapters[0][name].dtype) for name, t in weighted_sum(adapters, weights).items()}


def rank_dim(name: str) -> int | None:
    """The dimension of a LoRA tensor that its rank indexes: A's rows (r, in), B's columns (out, r); None for any
    other tensor (a U-shaped split's head)."""
    if ".lora_A." in name:
        return 0
    if ".lora_B." in name:
        return 1
    return None


def truncated(adapter: Adapter, rank: int) -> Adapter:
    """A device's adapter at `rank` from the global one (HetLoRA's download): the first `rank` rows of every LoRA A,
    the first `rank` columns of every LoRA B; other tensors as they are."""
    out = {}
    for name, tensor in adapter.items():
        dim = rank_dim(name)
        out[name] = tensor if dim is None else tensor.narrow(dim, 0, min(rank, tensor.shape[dim]))
    return out


def zero_padded(adapter: Adapter, rank: int) -> Adapter:
    """A device's adapter back at the global `rank` (HetLoRA's upload): every LoRA A padded with zero rows, every
    LoRA B with zero columns. The weighted average of zero-padded adapters is the rank-heterogeneous FedAvg."""
    out = {}
    for name, tensor in adapter.items():
        dim = rank_dim(name)
        if dim is None or tensor.shape[dim] == rank:
            out[name] = tensor
            continue
        shape = list(tensor.shape)
        shape[dim] = rank - tensor.shape[dim]
        out[name] = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
    return out


def adam_update(global_adapter: Adapter, average: Adapter, m: Adapter, v: Adapter, lr: float, beta1: float,
                beta2: float, tau: float) -> tuple[Adapter, Adapter, Adapter]:
    """FedAdam: delta = average - global; m, v moments of delta; x += lr * m / (sqrt(v) + tau)."""
    new_m, new_v, new_x = {}, {}, {}
    for name, x in global_adapter.items():
        delta = average[name] - x
        new_m[name] = beta1 * m.get(name, torch.zeros_like(x)) + (1 - beta1) * delta
        new_v[name] = beta2 * v.get(name, torch.zeros_like(x)) + (1 - beta2) * delta * delta
        new_x[name] = x + lr * new_m[name] / (new_v[name].sqrt() + tau)
    return new_x, new_m, new_v


def yogi_update(global_adapter: Adapter, average: Adapter, m: Adapter, v: Adapter, lr: float, beta1: float,
                beta2: float, tau: float) -> tuple[Adapter, Adapter, Adapter]:
    """FedYogi: v -= (1 - beta2) delta^2 sign(v - delta^2), so v grows additively, not multiplicatively."""
    new_m, new_v, new_x = {}, {}, {}
    for name, x in global_adapter.items():
        delta = average[name] - x
        squared = delta * delta
        new_m[name] = beta1 * m.get(name, torch.zeros_like(x)) + (1 - beta1) * delta
        previous = v.get(name, torch.zeros_like(x))
        new_v[name] = previous - (1 - beta2) * squared * torch.sign(previous - squared)
        new_x[name] = x + lr * new_m[name] / (new_v[name].sqrt() + tau)
    return new_x, new_m, new_v


# --------------------------------------------------------------------------- the strategies


class Strategy:
    """Decides a round's local-training instructions and its aggregation; keeps its own state."""


    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.agg = config.aggregation

    def configure_fit(self, round_index: int) -> FitInstructions:
        return FitInstructions()

    def aggregate(self, round_index: int, global_adapter: Adapter, average: Adapter) -> Adapter:
        """The new global adapter from the round's weighted average of the devices that finished."""
        return average

    def state(self) -> dict[str, Adapter]:
        """Everything needed to continue exactly (server-optimizer moments), for the checkpoint."""
        return {}

    def load_state(self, state: dict[str, Adapter]) -> None:
        del state


class FedAvg(Strategy):
    """The base rule: the weighted average is the new global adapter."""


class FedProx(Strategy):
    """FedAvg, every device's local objective with the proximal term mu/2 ||w - w_global||^2."""

    def configure_fit(self, round_index: int) -> FitInstructions:
        return FitInstructions(proximal_mu=self.agg.proximal_mu)


class FedAdam(Strategy):
    """A server Adam step on the pseudo-gradient (average - global)."""

    update = staticmethod(adam_update)

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__(config)
        self.m: Adapter = {}
        self.v: Adapter = {}

    def aggregate(self, round_index: int, global_adapter: Adapter, average: Adapter) -> Adapter:
        a = self.agg
        new, self.m, self.v = self.update(global_adapter, average, self.m, self.v, a.server_lr, a.beta1, a.beta2,
                                          a.tau)
        return new

    def state(self) -> dict[str, Adapter]:
        return {"m": self.m, "v": self.v}

    def load_state(self, state: dict[str, Adapter]) -> None:
        self.m, self.v = dict(state.get("m", {})), dict(state.get("v", {}))


class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second moment."""

    update = staticmethod(yogi_update)


class FfaLora(Strategy):
    """LoRA's A factors frozen at their shared initialisation; only B trained and averaged."""

    def configure_fit(self, round_index: int) -> FitInstructions:
        return FitInstructions(frozen=FROZEN_LORA_A)

    def aggregate(self, round_index: int, global_adapter: Adapter, average: Adapter) -> Adapter:
        # every device kept A at the global value: take it as is (an average would only add rounding)
        fit = self.configure_fit(round_index)
        return {n: global_adapter[n] if fit.is_frozen(n) else t for n, t in average.items()}


# the names are the config's (`aggregation.strategy`), listed there once
STRATEGIES: dict[str, type[Strategy]] = dict(zip(AGGREGATION_STRATEGIES, (FedAvg, FedProx, FedAdam, FedYogi, FfaLora),
                                                 strict=True))


def build_strategy(config: ExperimentConfig) -> Strategy:
    return STRATEGIES[config.aggregation.strategy](config)


def local_step(adapter: Adapter, optimizer: torch.optim.Optimizer, anchor: Adapter | None, proximal_mu: float
               ) -> None:
    """A device's optimizer step after its backward; FedProx adds mu (w - w_global), the gradient of
    mu/2 ||w - w_global||^2, to every trained gradient first (a cohort's stacked adapters against the global one,
    broadcast). The one place FedProx's term is applied."""
    if anchor is not None:
        with torch.no_grad():
            for name, tensor in adapter.items():
                if tensor.grad is not None:
                    tensor.grad += proximal_mu * (tensor - anchor[name])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
