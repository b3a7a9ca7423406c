"""How closely two execution paths of one computation must agree on any host, and why
(docs/concepts/models-and-data.md).

Hosts differ in their kernels (AVX512 or AVX2 torch kernels, other blockings and summation orders), so two
paths that do the same arithmetic in another order agree only up to float rounding, and rounding is amplified
by two things a run does:

1. the codec's stochastic rounding: a value within rounding of a level boundary can land one level up or
   down ("a flip"); a flipped element differs by a whole quantization step;
2. AdamW: its update lr·m̂/(√v̂ + ε) is about lr·sign(g) for any gradient well above ε = 1e-8, so an element
   whose gradient is within rounding of zero moves by up to lr in a direction rounding decides.

So the tests compare what is determined up to rounding tightly, and what an optimizer step or a flip can
amplify by a bound derived here:

- values of continuous maps of the same inputs — smashed data before the codec, losses, gradients before an
  optimizer step, adapters after steps whose inputs agree to rounding — agree to TIGHT = 1e-5 of their scale.
  float32 rounds each operation to 6e-8 relative; sums of a few hundred terms in another order stay below
  1e-6 relative (measured: 3.9e-7 on losses under `rounding_noise`), so 1e-5 leaves a margin of 10.
- adapters after AdamW steps: every element within TIGHT of the scale except at most LOOSE_FRACTION = 2 % of
  them (those whose gradient was within rounding of zero at some step: 18 of 3,584, 0.5 %, after three rounds
  under `rounding_noise`, while a LoRA scaling off by 1e-3 moves most), and those within the most AdamW can
  move an element, `adamw_reach(lr, steps)`, twice (both paths may move it).
- messages of the quantized codec: the same integer levels except flips, each by one level, at most
  FLIP_FRACTION of the values (a flip needs a value within rounding of a boundary: probability ~1e-6 per value
  at 6 bits).

End-to-end comparisons of runs (Ray against the reference runtime, DeepSpeed against the torch engine) compare
adapters only for lossless messages (32-bit codec both ways): with a quantized codec a flip in round 1 changes
every later gradient a little and AdamW turns that into differences of up to lr per element (measured: 1.1e-3
after three rounds under `rounding_noise`), which no fixed tolerance separates from a bug. Quantized runs are
compared on what stays exact (samples, payload bits, participation counts) and on the first local step's loss,
which depends only on the uplink: a flip moves it by about 5e-6 (measured), a different rounding stream
(another device's codec seed) by about 1e-4.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch

from sflam.platform import codec

TIGHT = 1e-5
LOOSE_FRACTION = 0.02
FLIP_FRACTION = 1e-3
FIRST_STEP_LOSS = 3e-5
BETAS = (0.9, 0.999)  # torch's AdamW defaults, which every optimizer of the platform uses


def scale(t: torch.Tensor) -> float:
    return max(float(t.detach().abs().max()), 1e-30) if t.numel() else 1.0


def assert_determined(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """A value determined up to rounding: within TIGHT of its scale."""
    assert actual.shape == expected.shape, what
    difference = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    assert difference <= TIGHT * scale(expected), f"{what}: {difference:.3g} > {TIGHT:g} x {scale(expected):.3g}"


def adamw_reach(lr: float, steps: int) -> float:
    """The most `steps` AdamW steps at learning rate `lr` can move one element (weight decay 0).

    |m̂_t| / √v̂_t ≤ ((1 - β1) / (1 - β1^t)) / √((1 - β2) / (1 - β2^t)) · √(Σ_{i≤t} β1^(2(t-i)) / β2^(t-i))
    by Cauchy-Schwarz over the gradients' contributions (1.0 at t = 1, 1.06 at t = 12)."""
    b1, b2 = BETAS
    total = 0.0
    for t in range(1, steps + 1):
        ratio = ((1 - b1) / (1 - b1**t)) / math.sqrt((1 - b2) / (1 - b2**t))
        total += ratio * math.sqrt(sum(b1 ** (2 * (t - i)) / b2 ** (t - i) for i in range(1, t + 1)))
    return lr * total


def assert_adamw_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], reach: float,
                       what: str = "adapter") -> None:
    """Tensors after optimizer steps that can move one element by at most `reach` (e.g. `adamw_reach`; a weighted
    sum of such tensors: times the total weight): each path may move an element that far, so 2 x reach."""
    assert actual.keys() == expected.keys() and expected, what
    reach = 2 * reach
    loose = total = 0
    for name in expected:
        a, e = actual[name].double(), expected[name].double()
        assert a.shape == e.shape, (what, name)
        difference = (a - e).abs()
        worst = float(difference.max()) if difference.numel() else 0.0
        assert worst <= reach, f"{what} {name}: {worst:.3g} beyond AdamW's reach {reach:.3g}"
        loose += int((difference > TIGHT * scale(e)).sum())
        total += difference.numel()
    assert loose <= LOOSE_FRACTION * total, f"{what}: {loose} of {total} elements differ by more than rounding"


def levels(encoded: codec.Encoded) -> np.ndarray:
    """The integer levels of a quantized message (rows × values)."""
    values = codec.decode(encoded).double().reshape(-1, encoded.shape[-1])
    offset = torch.from_numpy(np.asarray(encoded.offset, dtype=np.float64)).reshape(-1, 1)
    step = torch.from_numpy(np.asarray(encoded.scale, dtype=np.float64)).reshape(-1, 1)
    return torch.round((values - offset) / torch.where(step > 0, step, 1.0)).long().numpy()


def assert_same_message(actual: codec.Encoded, expected: codec.Encoded, what: str) -> int:
    """Two encodings of values that agree up to rounding: the same size, side information to rounding and, for a
    quantized codec, the same levels but for flips; returns the number of flips."""
    assert (actual.bits, actual.shape, actual.payload_bits) == (expected.bits, expected.shape,
                                                                expected.payload_bits), what
    if expected.bits == 32:
        assert_determined(codec.decode(actual), codec.decode(expected), what)
        return 0
    # the side information: row minima to rounding of the values' magnitude, steps to rounding of themselves
    values = codec.decode(expected)
    offsets = [torch.from_numpy(np.asarray(e.offset, dtype=np.float64)) for e in (actual, expected)]
    assert float((offsets[0] - offsets[1]).abs().max()) <= TIGHT * scale(values), f"{what} offsets"
    steps = [torch.from_numpy(np.asarray(e.scale, dtype=np.float64)) for e in (actual, expected)]
    assert bool(((steps[0] - steps[1]).abs() <= TIGHT * steps[1].abs()).all()), f"{what} steps"
    moved = np.abs(levels(actual) - levels(expected))
    flips = int((moved > 0).sum())
    assert int(moved.max(initial=0)) <= 1, f"{what}: a level moved by {int(moved.max())}"
    assert flips <= max(1, FLIP_FRACTION * moved.size), f"{what}: {flips} of {moved.size} levels differ"
    return flips


@contextlib.contextmanager
def rounding_noise(relative: float = 2.0**-20, absolute: float = 2.0**-30, seed: int = 0) -> Iterator[None]:
    """Within: what another host's kernels change, in this process. Every value entering the codec and every
    gradient entering an AdamW step is perturbed by `relative` (2^-20, eight units in the last place of float32)
    of itself plus `absolute` of its tensor's scale (the rounding of a sum whose terms cancel)."""
    generator = torch.Generator().manual_seed(seed)

    def jitter(x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() or x.numel() == 0:
            return x
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return x * (1 + relative * noise) + absolute * scale(x) * torch.randn(x.shape, generator=generator,
                                                                             dtype=x.dtype)

    encode, encode_many, step = codec.encode, codec.encode_many, torch.optim.AdamW.step

    def noisy_encode(rows: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        return encode(jitter(rows), *args, **kwargs)

    def noisy_encode_many(rows: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        return encode_many(jitter(rows), *args, **kwargs)

    def noisy_step(self: torch.optim.Optimizer, *args, **kwargs):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.copy_(jitter(p.grad))
        return step(self, *args, **kwargs)

    codec.encode, codec.encode_many = noisy_encode, noisy_encode_many  # type: ignore[assignment]
    torch.optim.AdamW.step = noisy_step  # type: ignore[method-assign]
    try:
        yield
    finally:
        codec.encode, codec.encode_many = encode, encode_many  # type: ignore[assignment]
        torch.optim.AdamW.step = step  # type: ignore[method-assign]


# --------------------------------------------------------------------------- whole runs


LOSSLESS = ("quant.activation_bits=32", "quant.gradient_bits=32", "allocation.distortion_bits=32")


def fedadam_reach(server_lr: float, beta1: float, beta2: float, rounds: int) -> float:
    """The most FedAdam / FedYogi's server step (without bias correction) can move one element in `rounds`
    rounds: |m| / √v ≤ (1 - β1) / √(1 - β2) · √(Σ_{i≤t} β1^(2(t-i)) / β2^(t-i)) by Cauchy-Schwarz, Yogi's
    v being no smaller than Adam's for these bounds' purpose (it moves by at most the same squared deltas)."""
    return server_lr * sum((1 - beta1) / math.sqrt(1 - beta2)
                           * math.sqrt(sum(beta1 ** (2 * (t - i)) / beta2 ** (t - i) for i in range(1, t + 1)))
                           for t in range(1, rounds + 1))


def assert_runs_agree(actual, expected, config) -> None:  # type: ignore[no-untyped-def]
    """Two runs of one config on two paths (RunResults): exact in what is counted, to rounding in what is
    determined by it, within AdamW's reach in adapters (lossless messages only; see the module docstring)."""
    assert len(actual.rounds) == len(expected.rounds)
    for a, e in zip(actual.rounds, expected.rounds, strict=True):
        assert (a.samples, a.uplink_bits, a.downlink_bits) == (e.samples, e.uplink_bits, e.downlink_bits)
        assert (a.selected, a.finished, a.dropped, a.late) == (e.selected, e.finished, e.dropped, e.late)
        assert len(a.step_losses) == len(e.step_losses)
    ours = np.array([loss for r in actual.rounds for loss in r.step_losses])
    theirs = np.array([loss for r in expected.rounds for loss in r.step_losses])
    lossless = config.quant.activation_bits == config.quant.gradient_bits == 32 \
        and config.allocation.distortion_bits == 32
    if not lossless:
        assert abs(ours[0] - theirs[0]) <= FIRST_STEP_LOSS, (ours[0], theirs[0])
        # later steps: the same run within what flips and AdamW do to a loss (3.4e-4 relative after 3 rounds)
        assert np.all(np.abs(ours - theirs) <= 1e-2 * np.abs(theirs)), (ours, theirs)
        return
    assert np.all(np.abs(ours - theirs) <= TIGHT * np.abs(theirs)), (ours, theirs)
    train, agg = config.train, config.aggregation
    steps = train.rounds * train.local_steps  # the learning-rate schedule's factor is at most 1
    reach = adamw_reach(train.device_lr, steps)
    if agg.strategy in ("fedadam", "fedyogi"):  # the server optimizer moves the global adapter too
        reach += fedadam_reach(agg.server_lr, agg.beta1, agg.beta2, train.rounds)
    assert_adamw_close(actual.device_adapter, expected.device_adapter, reach, what="device adapter")
    if expected.server_state:
        assert_adamw_close(actual.server_state, expected.server_state, adamw_reach(train.server_lr, steps),
                           what="server state")
