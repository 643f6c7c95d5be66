"""Projected gradient descent on text-encoder outputs: the L∞ ball around the clean embeddings, signed steps."""

from __future__ import annotations

from collections.abc import Callable

import torch


def project(
    adversarial: torch.Tensor, clean: torch.Tensor, epsilon: float, bounds: torch.Tensor | None
) -> torch.Tensor:
    """`adversarial` pulled back into the L∞ ball of radius `epsilon` around `clean`, then into `bounds`
    ((P, 2): each prompt's [min, max] over its clean embedding, so no coordinate leaves the encoder's range)."""
    adversarial = clean + (adversarial - clean).clamp(-epsilon, epsilon)
    if bounds is not None:
        low, high = (b.view(-1, *([1] * (clean.dim() - 1))) for b in bounds.unbind(1))
        adversarial = torch.maximum(torch.minimum(adversarial, high), low)
    return adversarial


def embedding_bounds(clean: torch.Tensor) -> torch.Tensor:
    """(P, 2) per-prompt [min, max] of the clean embeddings (RACE clamps its attack to that range)."""
    flat = clean.flatten(1)
    return torch.stack([flat.min(1).values, flat.max(1).values], 1)


def pgd(
    loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
    clean: torch.Tensor,
    epsilon: float,
    step_size: float,
    num_steps: int,
    generator: torch.Generator,
    clamp_to_range: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise `loss_fn(embeddings, step)` (one loss per prompt, shape (P,)) over embeddings in the ε-ball.

    Random start uniform in the ball, then `num_steps` steps of −step_size · sign(∇). Prompts are independent rows
    of one batch: the summed loss gives each row its own gradient. Returns (adversarial embeddings, last losses).
    """
    clean = clean.detach()
    bounds = embedding_bounds(clean) if clamp_to_range else None
    start = torch.rand(clean.shape, generator=generator).to(clean) * 2 - 1
    adversarial = project(clean + epsilon * start, clean, epsilon, bounds)
    losses = torch.full((clean.shape[0],), float("nan"), device=clean.device)
    for step in range(num_steps):
        adversarial.requires_grad_(True)
        losses = loss_fn(adversarial, step)
        (grad,) = torch.autograd.grad(losses.sum(), adversarial)
        adversarial = project(adversarial.detach() - step_size * grad.sign(), clean, epsilon, bounds)
    return adversarial.detach(), losses.detach()
