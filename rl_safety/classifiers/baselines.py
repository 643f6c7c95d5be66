"""The baselines' math: the L∞ PGD attack used for training, PGD-AT (Madry et al.) and TRADES (Zhang et al.)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Logits = Callable[[torch.Tensor], torch.Tensor]


def pgd_attack(
    model: Logits,
    x: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float,
    step_size: float,
    steps: int,
    loss: str = "ce",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L∞ PGD from a uniform random start, ascending cross-entropy (`ce`) or, for TRADES, KL to the clean
    prediction (`kl`, started at 0.001·N(0, 1) as in the TRADES code); returns detached points in ε-ball ∩ [0, 1]."""
    x = x.detach()
    with torch.no_grad():
        clean = F.softmax(model(x), dim=1) if loss == "kl" else None
    if loss == "kl":
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(x) * 1e-3
    else:
        noise = (torch.rand(x.shape, generator=generator, device="cpu").to(x) * 2 - 1) * epsilon
    adv = (x + noise).clamp(0, 1)
    for _ in range(steps):
        with torch.enable_grad():
            adv.requires_grad_(True)
            logits = model(adv)
            if loss == "kl":
                value = F.kl_div(F.log_softmax(logits, dim=1), clean, reduction="sum")
            else:
                value = F.cross_entropy(logits, labels, reduction="sum")
            (grad,) = torch.autograd.grad(value, adv)
        adv = adv.detach() + step_size * grad.sign()
        adv = torch.min(torch.max(adv, x - epsilon), x + epsilon).clamp(0, 1)
    return adv.detach()


def pgd_at_loss(logits_adv: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PGD-AT: cross-entropy on the PGD points only."""
    return F.cross_entropy(logits_adv, labels)


def trades_loss(
    logits_clean: torch.Tensor, logits_adv: torch.Tensor, labels: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, CE, KL): CE(clean) + β·KL(p_clean ‖ p_adv), the KL averaged over the batch."""
    ce = F.cross_entropy(logits_clean, labels)
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
    return ce + beta * kl, ce, kl
