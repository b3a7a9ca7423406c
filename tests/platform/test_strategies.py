"""Aggregation strategies against hand-computed references: three devices, two rounds
(docs/concepts/round-engine.md)."""

from __future__ import annotations

import math

import pytest
import torch

from sflam.platform.config import load_config
from sflam.platform.errors import ConfigError
from sflam.platform.strategies import (
    FedAdam,
    FedYogi,
    FitInstructions,
    build_strategy,
    local_step,
    weighted_average,
    weighted_sum,
    yogi_update,
)

# three devices' adapters after round 1 and round 2, and their aggregation weights (samples trained)
ROUND_1 = [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
ROUND_2 = [{"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, -1.0])}]
WEIGHTS = [16.0, 8.0, 8.0]


def test_fedavg_weights_by_samples_trained() -> None:
    avg = weighted_average(ROUND_1, WEIGHTS)
    # (16*1 + 8*3 + 8*0) / 32 = 1.25 ; (16*-2 + 0 + 8*4) / 32 = 0
    assert avg["w"].tolist() == [1.25, 0.0]


def adam_by_hand(x, avgs, lr, b1, b2, tau, yogi=False):
    m = v = 0.0
    for a in avgs:
        d = a - x
        m = b1 * m + (1 - b1) * d
        v = v - (1 - b2) * d * d * math.copysign(1, v - d * d) * (v != d * d) if yogi else b2 * v + (1 - b2) * d * d
        x = x + lr * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name, cls, yogi", [("fedadam", FedAdam, False), ("fedyogi", FedYogi, True)])
def test_server_optimizers_follow_reddi_et_al(name, cls, yogi) -> None:
    config = load_config(None, [f"aggregation.strategy={name}", "aggregation.server_lr=0.1",
                                "aggregation.beta1=0.9", "aggregation.beta2=0.99", "aggregation.tau=0.001"])
    strategy = build_strategy(config)
    assert isinstance(strategy, cls)
    x = {"w": torch.tensor([0.5, 0.5])}
    averages = [weighted_average(ROUND_1, WEIGHTS), weighted_average(ROUND_2, WEIGHTS)]
    for average in averages:
        x = strategy.aggregate(0, x, average)
    for j in range(2):
        expected = adam_by_hand(0.5, [float(a["w"][j]) for a in averages], 0.1, 0.9, 0.99, 0.001, yogi)
        assert float(x["w"][j]) == pytest.approx(expected, rel=1e-6)
    # its moments are its checkpoint: a fresh strategy loaded from them continues identically
    again = build_strategy(config)
    again.load_state(strategy.state())
    nxt = {"w": torch.tensor([1.0, 1.0])}
    assert torch.equal(again.aggregate(2, x, nxt)["w"], strategy.aggregate(2, x, nxt)["w"])


def test_fedprox_and_ffa_lora_instruct_the_devices() -> None:
    prox = build_strategy(load_config(None, ["aggregation.strategy=fedprox", "aggregation.proximal_mu=0.5"]))
    assert prox.configure_fit(0) == FitInstructions(proximal_mu=0.5)
    # the term local_step adds to the loss's gradient g, mu (w - w_global), seen through plain SGD at learning rate 1
    w = torch.tensor([2.0, 0.0], requires_grad=True)
    w.grad = torch.tensor([0.25, -1.0])
    local_step({"w": w}, torch.optim.SGD([w], lr=1.0), {"w": torch.tensor([1.0, 1.0])}, 0.5)
    assert w.detach().tolist() == [2.0 - (0.25 + 0.5), 0.0 - (-1.0 - 0.5)]
    ffa = build_strategy(load_config(None, ["aggregation.strategy=ffa-lora"])).configure_fit(0)
    assert ffa.is_frozen("model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert not ffa.is_frozen("model.layers.0.self_attn.q_proj.lora_B.default.weight")


def test_bad_aggregation_values_name_the_key(tmp_path) -> None:
    bad = tmp_path / "trace.csv"
    bad.write_text("device,round\n3,first\n")
    with pytest.raises(ConfigError, match=r"participation\.trace=.* columns device,round of integers"):
        load_config(None, [f"participation.trace={bad}"])
    with pytest.raises(ConfigError, match=r"aggregation\.strategy='fedsgd' is invalid: one of fedavg"):
        load_config(None, ["aggregation.strategy=fedsgd"])
    with pytest.raises(ConfigError, match=r"aggregation\.weights='equal' is invalid: trained or shard"):
        load_config(None, ["aggregation.weights=equal"])
    with pytest.raises(ConfigError, match=r"participation\.dropout=1\.0"):
        load_config(None, ["participation.dropout=1.0"])


def test_one_device_averages_to_itself_and_none_to_nothing() -> None:
    """A round where one device reports gives its adapter back, in its own dtype; a round with none, nothing."""
    alone = {"w": torch.tensor([0.5, -1.25], dtype=torch.bfloat16)}
    average = weighted_average([alone], [7.0])
    assert average["w"].dtype == torch.bfloat16 and torch.equal(average["w"], alone["w"])
    assert weighted_sum([], []) == {} and weighted_average([], []) == {}


def test_yogi_leaves_an_untouched_parameter_where_it_is() -> None:
    """FedYogi by hand (lr 0.1, beta1 0.9, beta2 0.99, tau 1e-3, fresh moments): a parameter whose average equals
    the global value (delta 0) keeps its value and a zero second moment; one with delta 1 gets m = 0.1,
    v = 0 - 0.01 * 1 * sign(0 - 1) = 0.01 and moves by 0.1 * 0.1 / (0.1 + 1e-3)."""
    new, m, v = yogi_update({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 3.0])}, {}, {}, 0.1, 0.9,
                            0.99, 1e-3)
    assert m["w"].tolist() == pytest.approx([0.0, 0.1]) and v["w"].tolist() == pytest.approx([0.0, 0.01])
    assert new["w"].tolist() == pytest.approx([1.0, 2.0 + 0.01 / 0.101])


def test_fedadam_resumed_without_moments_starts_them_afresh() -> None:
    """A checkpoint without server moments (saved before any FedAdam step) resumes as a new FedAdam does."""
    config = load_config(None, ["aggregation.strategy=fedadam"])
    fresh, resumed = build_strategy(config), build_strategy(config)
    resumed.load_state({})
    x, avg = {"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([2.0, 0.5])}
    assert torch.equal(resumed.aggregate(0, x, avg)["w"], fresh.aggregate(0, x, avg)["w"])


def test_ffa_lora_keeps_the_global_a_factors_exactly() -> None:
    """FFA-LoRA's new adapter takes A from the global adapter as it is (not from an average, which could only
    add rounding) and B from the average."""
    ffa = build_strategy(load_config(None, ["aggregation.strategy=ffa-lora"]))
    a_name, b_name = "q_proj.lora_A.default.weight", "q_proj.lora_B.default.weight"
    global_adapter = {a_name: torch.tensor([0.1, 0.2]), b_name: torch.tensor([0.0, 0.0])}
    average = {a_name: torch.tensor([0.1000001, 0.2]), b_name: torch.tensor([0.3, -0.4])}
    new = ffa.aggregate(1, global_adapter, average)
    assert torch.equal(new[a_name], global_adapter[a_name]) and torch.equal(new[b_name], average[b_name])
