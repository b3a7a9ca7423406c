"""Optimisation-based white-box inversion: from intercepted messages and the known device part, optimise inputs.

UnSplit-style model inversion (Erdoğan et al., WPES 2022) without its model-stealing half, since the
server knows the device part's weights:

- images: the grey image x at the stored resolution (the auxiliary data's, e.g. 28x28 MNIST), resized,
  copied to every channel and normalised as the devices' input pipeline does (public code), minimising
  sum_t w_t ||f(x)_t - m_t||² + λ TV(x), w_t = 1 / (2 v_t) with v_t the message's expected noise
  variance per element (codec rounding plus the defence's noise), TV the squared total variation and
  λ = 1 / (2 s²), s² the auxiliary images' mean squared difference of neighbouring pixels: a MAP
  estimate under a Gaussian smoothness prior fitted on the auxiliary data, solved with L-BFGS from the
  auxiliary images' mean, pixels held in [0, 1] by a penalty and clipped at the end;
- text: relaxed token distributions p_i = softmax(z_i) per position, the expected embedding p_i E fed
  through the device part (`Target.forward_embeddings`), Adam on the logits z, the arg-max token at the
  end. The softmax runs over a support of `CANDIDATES` token ids per position, chosen over the whole
  vocabulary by the gradient: at the start and every `REFRESH` steps the tokens whose embeddings most
  decrease the loss to first order (-(∂L/∂e_i) · E_v) join the half of the support carrying most
  probability, so each step costs k instead of V embeddings per position.
"""

from __future__ import annotations

import torch

from sflam.privacy.attack import Attack, Auxiliary, Intercepted
from sflam.privacy.target import Target

CANDIDATES = 64  # token ids per position in the relaxed distribution's support
REFRESH = 50  # steps between re-choosing the support over the whole vocabulary
TEXT_LR = 0.1
BOX_WEIGHT = 1e3  # of the squared distance of the pixels from [0, 1]
VARIANCE_FLOOR = 1e-6  # of the mean squared message element: the noise variance assumed for exact messages
SCORE_CHUNK = 512  # positions scored against the whole vocabulary at once


def _top_tokens(gradient: torch.Tensor, table: torch.Tensor, count: int, exclude: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Per position, the `count` token ids whose embeddings decrease the loss most to first order."""
    picked = []
    for start in range(0, gradient.shape[0], SCORE_CHUNK):
        scores = -(gradient[start:start + SCORE_CHUNK] @ table.T)
        if exclude is not None:
            scores.scatter_(1, exclude[start:start + SCORE_CHUNK], -torch.inf)
        picked.append(scores.topk(count, dim=1).indices)
    return torch.cat(picked)


def invert_text(target: Target, intercepted: Intercepted, steps: int, attack: Attack) -> torch.Tensor:
    """Token ids (B, T) whose relaxed embeddings best reproduce the intercepted messages through the device part."""
    table = target.embedding_table()
    mask = intercepted.mask.bool()
    received = intercepted.messages[mask]
    scale = received.pow(2).sum(-1).mean().clamp_min(1e-12)
    template = table[target.pad_token_id].expand(*mask.shape, table.shape[1])

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        embeddings = template.clone()
        embeddings[mask] = rows
        out = target.forward_embeddings(embeddings, intercepted.mask)
        return (out[mask] - received).pow(2).sum(-1).mean() / scale

    def gradient_at(rows: torch.Tensor) -> torch.Tensor:
        point = rows.detach().requires_grad_(True)
        loss_of(point).backward()
        assert point.grad is not None
        return point.grad

    k = min(CANDIDATES, table.shape[0])
    start = table.mean(0).expand(received.shape[0], -1)  # the uniform distribution's expected embedding
    candidates = _top_tokens(gradient_at(start), table, k)
    logits = torch.zeros(candidates.shape, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=TEXT_LR)
    support = table[candidates]  # (n, k, E): the candidates' embeddings, gathered once per support
    for step in attack.steps(range(steps), steps, "optimising token distributions"):
        if step and step % REFRESH == 0 and k < table.shape[0]:
            with torch.no_grad():
                rows = torch.einsum("nk,nke->ne", logits.softmax(-1), support)
                kept = logits.topk(k // 2, dim=1).indices
                kept_ids, kept_logits = candidates.gather(1, kept), logits.gather(1, kept)
            fresh = _top_tokens(gradient_at(rows), table, k - k // 2, exclude=kept_ids)
            candidates = torch.cat([kept_ids, fresh], dim=1)
            start_logit = kept_logits.min(1, keepdim=True).values.expand(-1, k - k // 2)
            logits = torch.cat([kept_logits, start_logit], dim=1).requires_grad_(True)
            optimizer = torch.optim.Adam([logits], lr=TEXT_LR)
            support = table[candidates]
        rows = torch.einsum("nk,nke->ne", logits.softmax(-1), support)
        loss = loss_of(rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    out = torch.full(mask.shape, target.pad_token_id, dtype=torch.long)
    out[mask] = candidates.gather(1, logits.detach().argmax(1, keepdim=True)).squeeze(1)
    return out


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Squared total variation: the sum of squared differences of neighbouring pixels, per image summed."""
    return ((images[..., 1:, :] - images[..., :-1, :]).pow(2).sum()
            + (images[..., :, 1:] - images[..., :, :-1]).pow(2).sum())


def smoothness(images: torch.Tensor) -> float:
    """The prior's weight 1 / (2 s²): s² the mean squared difference of neighbouring pixels of `images` (N, s, s)."""
    differences = torch.cat([(images[:, 1:] - images[:, :-1]).reshape(-1), (images[:, :, 1:] - images[:, :, :-1]
                                                                             ).reshape(-1)])
    return 0.5 / max(float(differences.pow(2).mean()), 1e-6)


def invert_images(target: Target, intercepted: Intercepted, aux_images: torch.Tensor, steps: int, attack: Attack
                  ) -> torch.Tensor:
    """Grey images (B, S, S) in [0, 1] at the model's input size: the MAP estimate under the squared-TV prior at the
    stored resolution, `steps` evaluations of L-BFGS."""
    geometry = target.geometry
    assert geometry is not None
    received, mask = intercepted.messages, intercepted.mask
    floor = VARIANCE_FLOOR * float(received.pow(2).mean())
    weight = 0.5 * mask / target.noise_variance(received, mask).clamp_min(floor)
    stored = geometry.to_original(aux_images)
    prior = smoothness(stored)
    images = stored.mean(0).expand(received.shape[0], -1, -1).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([images], lr=1.0, max_iter=steps, max_eval=steps, history_size=20,
                                  tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")
    ticks = iter(attack.steps(range(steps), steps, "L-BFGS evaluations"))

    def closure() -> torch.Tensor:
        next(ticks, None)
        optimizer.zero_grad(set_to_none=True)
        out = target.forward(geometry.to_input(geometry.from_original(images)), mask)
        outside = (images - images.clamp(0, 1)).pow(2).sum()  # pixels are in [0, 1]
        loss = ((weight[..., None] * (out - received).pow(2)).sum() + prior * total_variation(images)
                + BOX_WEIGHT * outside)
        loss.backward()
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    for _ in ticks:  # close the progress bar when L-BFGS stopped early
        pass
    return geometry.from_original(images.detach().clamp(0, 1))


class WhiteBoxInversion(Attack):
    name = "white-box"
    description = "optimisation-based: inputs optimised until the known device part reproduces the message"

    def budgets(self, modality: str) -> dict[str, int]:
        budget = {"optimisation_steps": self.config.optimisation_steps}
        if modality == "text":
            budget.update(candidates=CANDIDATES, refresh_every=REFRESH)
        else:
            budget["aux_samples"] = self.config.aux_samples  # their mean image (the start) and smoothness
        return budget

    def reconstruct(self, target: Target, aux: Auxiliary, intercepted: Intercepted, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.enable_grad():
            if target.modality == "text":
                return invert_text(target, intercepted, self.config.optimisation_steps, self)
            return invert_images(target, intercepted, aux.inputs, self.config.optimisation_steps, self)
