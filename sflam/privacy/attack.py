"""What every attack is: a fixed-budget, seeded reconstruction of the victims' inputs from their messages alone."""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from sflam.platform.config import PrivacyConfig
from sflam.privacy.target import Target

T = TypeVar("T")


@dataclass(frozen=True)
class Auxiliary:
    """The attacker's own data passed through the current target (same device part, codec and defence).

    Text: `messages` are the rows of every real token (R, H) and `inputs` each row's token id (R,).
    Images: `messages` are whole messages (N, T, H) and `inputs` the grey images (N, S, S) in [0, 1] at
    the model's input size.
    """

    messages: torch.Tensor
    inputs: torch.Tensor


@dataclass(frozen=True)
class Intercepted:
    """The victims' messages as the server received them (B, T, H), zeros at padding, and the masks (B, T)."""

    messages: torch.Tensor
    mask: torch.Tensor


class Attack(ABC):
    """One attack: `reconstruct` sees the target, the auxiliary data and the intercepted messages, never the
    victims' inputs; it returns token ids (B, T) or grey images (B, S, S) in [0, 1] at the model's input size."""

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, config: PrivacyConfig, progress: bool = False) -> None:
        self.config = config
        self.progress = progress

    def budgets(self, modality: str) -> dict[str, int]:
        """The fixed budget this attack spends (what a comparison of attacks must hold equal)."""
        return {"aux_samples": self.config.aux_samples}

    @abstractmethod
    def reconstruct(self, target: Target, aux: Auxiliary, intercepted: Intercepted, seed: int) -> torch.Tensor:
        """The attack's reconstruction of every intercepted sample's input."""

    def steps(self, iterable: Iterable[T], total: int, what: str) -> Iterator[T]:
        """`iterable` with a progress bar on stderr when progress is on."""
        if not self.progress:
            yield from iterable
            return
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=f"{self.name}: {what}", file=sys.stderr, leave=False,
                        dynamic_ncols=True)
