"""The tolerances of tests/equality.py hold under another host's rounding and still catch a real error."""

from __future__ import annotations

import pytest

from sflam.platform import cohort, device, messages, server
from sflam.platform.local import run_local
from tests.conftest import tiny_config
from tests.equality import LOSSLESS, adamw_reach, assert_runs_agree, rounding_noise

pytestmark = pytest.mark.equality

RUN = ("quant.weights=nf4", "train.devices_per_round=5")


def test_adamws_reach_is_its_first_steps_size() -> None:
    assert adamw_reach(0.01, 1) == pytest.approx(0.01)  # the first step moves every element by lr (sign of g)
    assert 0.01 * 12 < adamw_reach(0.01, 12) < 0.01 * 12 * 1.07


@pytest.mark.parametrize("messages", [LOSSLESS, ("quant.activation_bits=6", "quant.gradient_bits=8")],
                         ids=["lossless", "quantized"])
def test_runs_agree_under_another_hosts_rounding(messages: tuple[str, ...]) -> None:
    config = tiny_config(*RUN, *messages)
    reference = run_local(config)
    with rounding_noise():
        assert_runs_agree(run_local(config), reference, config)


def test_lossless_runs_disagree_when_a_device_part_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(*RUN, *LOSSLESS)
    reference = run_local(config)
    lora_forward = cohort._lora_forward

    def off_by_a_thousandth(module, *args, **kwargs):  # type: ignore[no-untyped-def]
        scaling = dict(module.scaling)
        module.scaling[cohort.LORA] = scaling[cohort.LORA] * 1.001
        try:
            return lora_forward(module, *args, **kwargs)
        finally:
            module.scaling.update(scaling)

    monkeypatch.setattr(cohort, "_lora_forward", off_by_a_thousandth)
    with pytest.raises(AssertionError):
        assert_runs_agree(run_local(config), reference, config)


def test_quantized_runs_disagree_when_a_device_uses_another_rounding_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(*RUN, "quant.activation_bits=6", "quant.gradient_bits=8")
    reference = run_local(config)
    def neighbours_stream(seed: int, round_index: int, step: int, device_id: int, direction: int):  # type: ignore[no-untyped-def]
        return messages.codec_generator(seed, round_index, step, device_id + 1, direction)

    monkeypatch.setattr(device, "codec_generator", neighbours_stream)
    monkeypatch.setattr(server, "codec_generator", neighbours_stream)
    with pytest.raises(AssertionError):
        assert_runs_agree(run_local(config), reference, config)
