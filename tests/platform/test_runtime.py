"""The reference runtime: SFL-V1 semantics, FedAvg, determinism, learning (docs/concepts/round-engine.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sflam.platform.assembly import Experiment
from sflam.platform.data import collate, device_batches
from sflam.platform.local import run_local, run_round
from sflam.platform.participation import select_devices
from sflam.platform.strategies import weighted_average as fedavg
from tests.conftest import tiny_config
from tests.equality import TIGHT, adamw_reach, assert_adamw_close


def test_fedavg_is_the_sample_weighted_mean() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    avg = fedavg([a, b], [1.0, 3.0])
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(avg["b"], torch.tensor([3.0]))
    assert fedavg([{}, {}], [1.0, 1.0]) == {}


def test_device_selection_is_seeded_without_repeats() -> None:
    first = select_devices(0, 3, 1000, 20)
    assert len(np.unique(first)) == 20 and np.array_equal(first, select_devices(0, 3, 1000, 20))
    assert not np.array_equal(first, select_devices(0, 4, 1000, 20))


def test_same_seed_gives_identical_metrics_and_adapters() -> None:
    config = tiny_config("quant.activation_bits=4", "quant.gradient_bits=6")
    one, two = run_local(config), run_local(config)
    assert one.rounds_as_dicts() and [
        {k: v for k, v in r.items() if k != "wall_s"} for r in one.rounds_as_dicts()
    ] == [{k: v for k, v in r.items() if k != "wall_s"} for r in two.rounds_as_dicts()]
    assert one.accuracy == two.accuracy and one.loss == two.loss
    assert all(torch.equal(one.device_adapter[n], two.device_adapter[n]) for n in one.device_adapter)
    other = run_local(tiny_config("seed=1", "quant.activation_bits=4", "quant.gradient_bits=6"))
    assert other.rounds[0].train_loss != one.rounds[0].train_loss


@pytest.mark.equality
def test_one_round_with_raw_transmission_matches_manual_sfl() -> None:
    """E=1, q=32: the round's new global adapter equals FedAvg of each device's one AdamW step on the
    gradient of the server's mean loss over all devices' micro-batches, computed without the runtime."""
    config = tiny_config("quant.activation_bits=32", "quant.gradient_bits=32", "train.local_steps=1",
                         "train.devices_per_round=3", "lora.server=false", "train.lr_schedule=constant",
                         "allocation.distortion_bits=32")  # no distortion allowed: every device sends fp32
    exp = Experiment.build(config)
    reference = Experiment.build(config)  # a second, identical copy for the manual computation
    global_adapter = exp.device.initial_adapter()
    new_global, metrics = run_round(exp, 0, global_adapter)

    selected = select_devices(config.seed, 0, config.data.num_devices, 3)
    batches = [collate(reference.data.train, device_batches(reference.data.shards[k], 8, 1, config.seed, 0, int(k))[0],
                       reference.data.pad_token_id) for k in selected]
    adapters = [{n: t.clone().requires_grad_(True) for n, t in global_adapter.items()} for _ in selected]
    hiddens = [torch.func.functional_call(reference.device.part, adapter, (b.input_ids, b.attention_mask),
                                          strict=False) for adapter, b in zip(adapters, batches, strict=True)]
    length = max(b.input_ids.shape[1] for b in batches)
    padded = torch.cat([torch.nn.functional.pad(h * b.attention_mask[..., None], (0, 0, 0, length - h.shape[1]))
                        for h, b in zip(hiddens, batches, strict=True)])
    mask = torch.cat([torch.nn.functional.pad(b.attention_mask, (0, length - b.attention_mask.shape[1]))
                      for b in batches])
    labels = torch.cat([b.labels for b in batches])
    loss, _ = reference.server.part.loss_and_correct(reference.server.part(padded, mask), labels)
    loss.backward()
    stepped = []
    for adapter in adapters:
        optimizer = torch.optim.AdamW(adapter.values(), lr=config.train.device_lr, weight_decay=0.0)
        optimizer.step()
        stepped.append({n: t.detach() for n, t in adapter.items()})
    weights = [float(len(b)) for b in batches]  # aggregation.weights=trained: the samples each device trained
    expected = fedavg(stepped, weights)
    # the same maths in another order: the loss to rounding, the adapters to rounding and one AdamW step's reach
    # for elements whose gradient is within rounding of zero (tests/equality.py)
    assert metrics.train_loss == pytest.approx(float(loss.detach()), rel=TIGHT)
    assert_adamw_close(new_global, expected, adamw_reach(config.train.device_lr, 1))


def test_training_learns_the_synthetic_task() -> None:
    result = run_local(tiny_config("train.rounds=8", "train.eval_every=4", "quant.weights=nf4"))
    assert result.rounds[-1].eval_accuracy is not None and result.rounds[3].eval_accuracy is not None
    assert result.accuracy > 0.8
    assert result.rounds[-1].train_loss < result.rounds[0].train_loss


def test_cut_zero_trains_only_the_server() -> None:
    result = run_local(tiny_config("split.cut_layer=0", "train.rounds=4", "train.eval_every=4"))
    assert result.device_adapter == {}
    assert all(r.downlink_bits == 0 for r in result.rounds)  # no gradients to send to embeddings only
    assert result.accuracy > 0.7


def test_causal_lm_task_learns_label_words() -> None:
    result = run_local(tiny_config("model.task=causal-lm", "train.rounds=8", "train.eval_every=8"))
    assert result.accuracy > 0.75


def test_payload_counts_only_real_tokens() -> None:
    config = tiny_config("quant.activation_bits=8", "train.rounds=1", "train.local_steps=1", "allocation.policy=equal")
    exp = Experiment.build(config)
    _, metrics = run_round(exp, 0, exp.device.initial_adapter())
    selected = select_devices(config.seed, 0, config.data.num_devices, config.train.devices_per_round)
    hidden = exp.device.part.config.hidden_size
    expected = 0
    for k in selected:
        batch = collate(exp.data.train, device_batches(exp.data.shards[k], 8, 1, config.seed, 0, int(k))[0], 0)
        tokens = int(batch.attention_mask.sum())
        expected += tokens * hidden * 8 + tokens * 64 + 32 * len(batch)  # values, fp32 offset+scale, header
    assert metrics.uplink_bits == expected
