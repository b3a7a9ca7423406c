"""The least-squares baselines: a linear probe from each smashed token to its token id, a linear image inversion.

Text: ridge regression of the one-hot token id on each received token vector (a least-squares linear
probe), over the token ids the auxiliary data holds; the victim's token is the arg-max score. Images:
at cut 0 a patch token is an affine function of its patch's pixels (the patch embedding plus the
position's embedding), so least squares from each patch token to its patch's pixels, shared over
positions with per-position means, inverts it up to the codec's noise; deeper it is the best linear
map. The ridge strength of both is chosen on a held-out tenth of the auxiliary data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sflam.privacy.attack import Attack, Auxiliary, Intercepted
from sflam.privacy.target import ImageGeometry, Target

RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)  # ridge strengths, relative to the mean eigenvalue of X^T X
VALIDATION_SHARE = 0.1


def to_patches(images: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """Grey images (N, S, S) as their patches (N, P, p²), row-major like the patch tokens."""
    g, p = geometry.grid, geometry.patch
    return images.reshape(-1, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(-1, g * g, p * p)


def from_patches(patches: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """The inverse of `to_patches`: (N, P, p²) -> grey images (N, S, S)."""
    g, p = geometry.grid, geometry.patch
    return patches.reshape(-1, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(-1, g * p, g * p)


def patch_tokens(messages: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """The patch tokens (N, P, H) of image messages (CLS, distillation and register tokens dropped)."""
    return messages[:, geometry.first_patch:geometry.first_patch + geometry.grid**2]


class Ridge:
    """Ridge regression Y ~ X W over centred data, for many strengths from one eigendecomposition of X^T X."""

    def __init__(self, x: torch.Tensor) -> None:
        x = x.double()
        gram = x.T @ x
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(gram)
        self.scale = float(self.eigenvalues.clamp_min(0).mean()) or 1.0

    def solve(self, xty: torch.Tensor, strength: float) -> torch.Tensor:
        """W = (X^T X + strength * mean eigenvalue * I)^-1 X^T Y."""
        inverse = 1.0 / (self.eigenvalues.clamp_min(0) + strength * self.scale)
        v = self.eigenvectors
        return v @ (inverse[:, None] * (v.T @ xty.double()))


def split(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (fit, held-out) split of `count` samples, a tenth held out."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held = max(1, int(VALIDATION_SHARE * count))
    return order[held:], order[:held]


def _token_xty(x: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """X^T Y for one-hot Y without building Y: each class's column is the sum of its rows."""
    return torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, classes, x.double()).T


@dataclass(frozen=True)
class TokenProbe:
    """A fitted linear probe: scores = (row - mean) W + class frequencies (the intercept of centred least squares)."""

    mean: torch.Tensor
    weight: torch.Tensor
    prior: torch.Tensor
    candidates: torch.Tensor

    def predict(self, rows: torch.Tensor) -> torch.Tensor:
        scores = (rows.double() - self.mean) @ self.weight + self.prior
        return self.candidates[scores.argmax(-1)]


def fit_token_probe(aux: Auxiliary, seed: int) -> TokenProbe:
    candidates, classes = torch.unique(aux.inputs, return_inverse=True)
    rows = aux.messages.double()
    train, held = split(len(rows), seed)
    best, best_accuracy = RIDGE_GRID[0], -1.0
    mean = rows[train].mean(0)
    ridge = Ridge(rows[train] - mean)
    xty = _token_xty(rows[train] - mean, classes[train], len(candidates))
    prior = torch.bincount(classes[train], minlength=len(candidates)).double() / len(train)
    for strength in RIDGE_GRID:
        probe = TokenProbe(mean, ridge.solve(xty, strength), prior, candidates)
        accuracy = float((probe.predict(rows[held]) == aux.inputs[held]).double().mean())
        if accuracy > best_accuracy:
            best, best_accuracy = strength, accuracy
    mean = rows.mean(0)
    prior = torch.bincount(classes, minlength=len(candidates)).double() / len(rows)
    weight = Ridge(rows - mean).solve(_token_xty(rows - mean, classes, len(candidates)), best)
    return TokenProbe(mean, weight, prior, candidates)


@dataclass(frozen=True)
class PatchInverse:
    """A fitted linear image inversion: patch pixels = (token - token mean of its position) W + pixel mean."""

    token_mean: torch.Tensor  # (P, H)
    weight: torch.Tensor  # (H, p²)
    pixel_mean: torch.Tensor  # (P, p²)
    geometry: ImageGeometry

    def predict(self, messages: torch.Tensor) -> torch.Tensor:
        tokens = patch_tokens(messages, self.geometry).double() - self.token_mean
        return from_patches(tokens @ self.weight + self.pixel_mean, self.geometry).float()


def fit_patch_inverse(aux: Auxiliary, geometry: ImageGeometry, seed: int) -> PatchInverse:
    tokens = patch_tokens(aux.messages, geometry).double()
    pixels = to_patches(aux.inputs, geometry).double()
    train, held = split(len(tokens), seed)

    def fit(images: torch.Tensor, strengths: tuple[float, ...]) -> list[PatchInverse]:
        token_mean, pixel_mean = tokens[images].mean(0), pixels[images].mean(0)
        x = (tokens[images] - token_mean).reshape(-1, tokens.shape[-1])
        y = (pixels[images] - pixel_mean).reshape(-1, pixels.shape[-1])
        ridge, xty = Ridge(x), x.T @ y
        return [PatchInverse(token_mean, ridge.solve(xty, s), pixel_mean, geometry) for s in strengths]

    errors = [float((inverse.predict(aux.messages[held]) - aux.inputs[held]).pow(2).mean())
              for inverse in fit(train, RIDGE_GRID)]
    best = RIDGE_GRID[min(range(len(errors)), key=errors.__getitem__)]
    return fit(torch.arange(len(tokens)), (best,))[0]


class LinearInversion(Attack):
    name = "linear"
    description = "least squares: text, a linear probe token vector -> token id; images, linear patch inversion"

    def reconstruct(self, target: Target, aux: Auxiliary, intercepted: Intercepted, seed: int) -> torch.Tensor:
        if target.modality == "text":
            probe = fit_token_probe(aux, seed)
            out = torch.full(intercepted.mask.shape, target.pad_token_id, dtype=torch.long)
            real = intercepted.mask.bool()
            out[real] = probe.predict(intercepted.messages[real])
            return out
        assert target.geometry is not None
        return fit_patch_inverse(aux, target.geometry, seed).predict(intercepted.messages).clamp(0, 1)
