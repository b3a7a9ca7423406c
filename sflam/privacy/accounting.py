"""(ε, δ) of clipped and noised smashed data: the Gaussian mechanism on every released message, Opacus' accountant.

What is guaranteed, precisely (the text `STATEMENT` goes into every report):

Mechanism. Each message a device sends for a sample is M(x) = g(x) + N(0, σ²C² I), with g(x) the
sample's whole message (every token row of it) after the codec, scaled to L2 norm at most C.
Sensitivity. Neighbouring inputs are two inputs x, x' of that one sample (replace-one), of the same
length. Then ||g(x) - g(x')||₂ <= ||g(x)||₂ + ||g(x')||₂ <= 2C, for every draw of the codec's
stochastic rounding, so the L2 sensitivity is 2C and the noise multiplier (noise standard deviation
over sensitivity) is σC / 2C = σ/2. (Adding the noise before the codec instead makes the codec
post-processing: the same bound.) The bound is attained when some x' gives g(x') = -g(x).
Composition. A sample is released once per local step that draws it. Its device's shard of n
samples is drawn E·min(b, n) times a round from successive permutations of the shard, so each sample
at most ceil(E·min(b, n) / n) times a round; over R rounds, in the worst case of a device selected in
every round, T = R·ceil(E·min(b, n) / n) releases (a device selected in r rounds: r in place of R).
The server knows which device sent which message, so there is no amplification by subsampling: the
accountant composes T Gaussian mechanisms of multiplier σ/2 at sampling rate 1.
Guarantee. The sequence of all of a sample's smashed-data messages is (ε, δ)-differentially private
with respect to that sample's input (local DP, per sample) against a server that sees every message.
Not covered: the label (sent in the clear), the input's length (the mask travels with the message),
which samples a device holds and when it trains, the device adapter it uploads each round (LoRA
updates computed from its samples, without noise) and activation gradients' effect on them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

ACCOUNTANTS = ("rdp", "prv")
STATEMENT = (
    "Each message of a sample is its whole smashed data after the codec, clipped to L2 norm C, plus N(0, sigma^2 C^2) "
    "per element: a Gaussian mechanism of sensitivity 2C (replace-one: two inputs of the sample, same length), noise "
    "multiplier sigma/2, composed over T releases (every local step that draws the sample, its device selected in "
    "every round; no subsampling amplification, the server knows who sent what) by Opacus' {accountant} accountant. "
    "Guarantee: all of a sample's messages together are (epsilon, delta)-DP with respect to that sample's input. Not "
    "covered: labels (sent in the clear), input lengths, device adapter uploads.")


def noise_multiplier(sigma: float) -> float:
    """Noise standard deviation over L2 sensitivity: σC / 2C (replace-one neighbours, clip norm C)."""
    return sigma / 2.0


def epsilon(sigma: float, releases: int, delta: float, accountant: str = "rdp") -> float:
    """ε of `releases` Gaussian mechanisms with noise σ·C on messages clipped to C (multiplier σ/2), at δ."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    if sigma <= 0:
        return math.inf
    if releases < 1:
        return 0.0
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant {accountant!r}: one of {', '.join(ACCOUNTANTS)}")
    counter = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    with warnings.catch_warnings():  # opacus warns when the optimal RDP order lies at the end of its grid
        warnings.simplefilter("ignore")
        for _ in range(releases):
            counter.step(noise_multiplier=noise_multiplier(sigma), sample_rate=1.0)
        return float(counter.get_epsilon(delta=delta))


def releases_per_round(shard_sizes: np.ndarray, batch_size: int, local_steps: int) -> int:
    """The most times any sample is drawn in one round (`sflam.platform.data.device_batches`: E mini-batches of
    min(b, n) from successive permutations of a shard of n samples)."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    sizes = sizes[sizes > 0]
    drawn = local_steps * np.minimum(batch_size, sizes)
    return int(np.max(-(-drawn // sizes)))


def worst_case_releases(shard_sizes: np.ndarray, batch_size: int, local_steps: int, rounds: int) -> int:
    """T: the releases of the most exposed sample, its device selected in every one of `rounds` rounds."""
    return rounds * releases_per_round(shard_sizes, batch_size, local_steps)


@dataclass(frozen=True)
class Guarantee:
    """The (ε, δ) of a configured defence, with everything it was computed from."""

    epsilon: float
    delta: float
    noise_sigma: float
    clip_norm: float
    noise_multiplier: float
    releases: int
    accountant: str
    statement: str

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def guarantee(noise_sigma: float, clip_norm: float, releases: int, delta: float, accountant: str = "rdp"
              ) -> Guarantee | None:
    """The guarantee of clipping to `clip_norm` plus noise `noise_sigma`; None when there is no noise (no DP)."""
    if noise_sigma <= 0 or clip_norm <= 0:
        return None
    return Guarantee(epsilon(noise_sigma, releases, delta, accountant), delta, noise_sigma, clip_norm,
                     noise_multiplier(noise_sigma), releases, accountant,
                     STATEMENT.format(accountant=accountant.upper()))
