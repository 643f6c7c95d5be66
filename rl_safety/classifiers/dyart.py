"""DyART's pure math: the soft margin, the FAB-style closest-boundary search, the filters and the margin loss.

DyART (Xu et al., ICLR 2023) moves the decision boundary away from the data by ascending the L∞ distance R_i from
each point to the zero level set of the soft margin φ. With x̂_i the closest point where φ = 0, the implicit
function theorem gives the closed form ∇_θ R_i = ∇_θ φ(x̂_i) / ‖∇ₓ φ(x̂_i)‖₁, so the loss
CE + λ·mean_i(−w_i·φ(x̂_i)) with detached w_i = h′(R_i) / ‖∇ₓ φ(x̂_i)‖₁ has the gradient of CE − λ·mean_i h(R_i).
Nothing here does I/O; `model` is any callable from images in [0, 1] to logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Logits = Callable[[torch.Tensor], torch.Tensor]


def soft_margin(logits: torch.Tensor, labels: torch.Tensor, beta: float = 5.0) -> torch.Tensor:
    """φ = z_y − (1/β)·logsumexp_{j≠y}(β·z_j), per row: positive when correct, zero on a (smoothed) boundary."""
    own = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return own - torch.logsumexp(beta * others, dim=1) / beta


def margin_and_input_gradient(
    model: Logits, x: torch.Tensor, labels: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(φ(x), ∇ₓφ(x)) per example, both detached; the model's parameters get no gradient."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        phi = soft_margin(model(x), labels, beta)
        (grad,) = torch.autograd.grad(phi.sum(), x)
    return phi.detach(), grad.detach()


def project_linf_box(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest-L∞ step d with w·(points + d) = b and points + d in [0, 1], per row of (B, D) inputs.

    With c = b − w·points (sign folded into w), coordinate i can move by at most cap_i towards sign(w_i) before
    leaving the box; the step moving every coordinate by min(τ, cap_i) reaches w·d = |c| for the smallest τ, found
    exactly by sorting the caps (the constraint is piecewise linear in τ). When even the box corner falls short,
    every coordinate moves to its bound: the closest the box allows.
    """
    c = b - (w * points).sum(dim=1)
    sign = torch.where(c < 0, -1.0, 1.0).to(points)
    ws = w * sign[:, None]  # now the step must achieve ws·d = |c| >= 0
    direction = torch.sign(ws)
    caps = torch.where(ws > 0, 1.0 - points, points).clamp(min=0.0)
    caps = torch.where(ws == 0, torch.zeros_like(caps), caps)
    weights = ws.abs()
    target = c.abs()
    sorted_caps, order = caps.sort(dim=1)
    sorted_w = weights.gather(1, order)
    # g(τ) at the breakpoints τ = cap_(k): fully used coordinates below k, τ·(weight of the rest) from k on.
    used = torch.cumsum(sorted_w * sorted_caps, dim=1) - sorted_w * sorted_caps
    rest = sorted_w.flip(1).cumsum(1).flip(1)
    at_breaks = used + sorted_caps * rest
    reached = at_breaks >= target[:, None]
    k = torch.where(reached.any(1), reached.float().argmax(1), torch.full_like(target, caps.shape[1] - 1).long())
    used_k = used.gather(1, k[:, None])[:, 0]
    rest_k = rest.gather(1, k[:, None])[:, 0]
    tau = ((target - used_k) / rest_k.clamp(min=1e-30)).clamp(min=0.0)
    tau = torch.where(reached.any(1), tau, sorted_caps[:, -1])  # infeasible: go to the box corner
    return direction * torch.minimum(tau[:, None], caps)


@dataclass
class BoundarySearch:
    """Result of `closest_boundary_point`: points, their L∞ distances and φ, and which searches succeeded."""

    points: torch.Tensor  # x̂ (the input itself where nothing was found)
    radius: torch.Tensor  # ‖x̂ − x‖∞ (inf where nothing was found)
    phi: torch.Tensor  # φ(x̂)
    success: torch.Tensor  # bool: x was correct (φ > 0) and a point with φ < 0 was found


@torch.no_grad()
def closest_boundary_point(
    model: Logits,
    x: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 5.0,
    steps: int = 20,
    overshoot: float = 1.05,
    start_radius: float = 4 / 255,
    alpha_max: float = 0.1,
    backtrack: float = 0.9,
    generator: torch.Generator | None = None,
) -> BoundarySearch:
    """FAB-style minimum-L∞-norm search for the closest point where φ changes sign (Croce & Hein 2020, with φ as
    the single scalar function as in DyART's code).

    Each step linearises φ at the iterate, projects both the iterate and the original point onto the linearised
    boundary with the box-constrained L∞ projection, takes a convex combination biased towards the original point
    (α ≤ alpha_max), overshoots by `overshoot`, and, once φ < 0, keeps the closest such point and steps back towards x.
    """
    shape = x.shape
    flat = x.reshape(len(x), -1)
    phi0, _ = margin_and_input_gradient(model, x, labels, beta)
    correct = phi0 > 0
    noise = torch.rand(flat.shape, generator=generator, device="cpu").to(x) * 2 - 1
    noise = noise / noise.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    current = (flat + start_radius * noise).clamp(0.0, 1.0)  # a random start at L∞ distance start_radius
    best = flat.clone()
    best_radius = torch.full((len(x),), float("inf"), device=x.device, dtype=x.dtype)
    for _ in range(steps):
        phi, grad = margin_and_input_gradient(model, current.reshape(shape), labels, beta)
        w = grad.reshape(len(x), -1)
        b = (w * current).sum(1) - phi  # linearised boundary {z : w·z = b}
        steps_both = project_linf_box(torch.cat([current, flat]), torch.cat([w, w]), torch.cat([b, b]))
        d_current, d_orig = steps_both[: len(x)], steps_both[len(x) :]
        a_current = d_current.abs().amax(1).clamp(min=1e-8)
        a_orig = d_orig.abs().amax(1).clamp(min=1e-8)
        alpha = (a_current / (a_current + a_orig)).clamp(0.0, alpha_max)[:, None]
        current = ((current + overshoot * d_current) * (1 - alpha) + (flat + overshoot * d_orig) * alpha).clamp(0, 1)
        phi_new = soft_margin(model(current.reshape(shape)), labels, beta)
        crossed = (phi_new < 0) & correct
        radius = (current - flat).abs().amax(1)
        better = crossed & (radius < best_radius)
        best = torch.where(better[:, None], current, best)
        best_radius = torch.where(better, radius, best_radius)
        current = torch.where(crossed[:, None], flat + (current - flat) * backtrack, current)
    points = best.reshape(shape)
    phi_best = soft_margin(model(points), labels, beta)
    return BoundarySearch(points=points, radius=best_radius, phi=phi_best, success=torch.isfinite(best_radius))


def closest_point_filter(
    x: torch.Tensor, search: BoundarySearch, grad: torch.Tensor, min_phi: float = -0.3, min_agreement: float = 0.9
) -> torch.Tensor:
    """Which found points look like local closest boundary points (DyART's 'high quality' filter).

    Keeps x̂ when φ(x̂) > min_phi (close to the zero level set) and, on the coordinates where |x̂ − x| is within
    80% of the L∞ radius, the step opposes ∇ₓφ(x̂) in at least `min_agreement` of them: the first-order optimality
    condition of the minimum-L∞ problem.
    """
    delta = (search.points - x).flatten(1)
    radius = delta.abs().amax(1, keepdim=True).clamp(min=1e-12)
    at_max = delta.abs() / radius > 0.8
    opposing = ((delta * grad.flatten(1)) < -1e-7) & at_max
    agreement = opposing.sum(1) / at_max.sum(1).clamp(min=1)
    return search.success & (search.phi > min_phi) & (agreement > min_agreement)


def h_prime(radius: torch.Tensor, alpha: float, r0: float) -> torch.Tensor:
    """h′(r) = exp(−α·r)·1[r < r0]: the weight of each point's radius in the objective mean h(R)."""
    return torch.where(radius < r0, torch.exp(-alpha * radius), torch.zeros_like(radius))


def margin_weights(radius: torch.Tensor, grad: torch.Tensor, alpha: float, r0: float) -> torch.Tensor:
    """w_i = h′(R_i) / ‖∇ₓφ(x̂_i)‖₁ (detached): makes ∇_θ(w·φ(x̂)) equal h′(R)·∇_θR, the closed-form margin gradient."""
    return (h_prime(radius, alpha, r0) / grad.flatten(1).abs().sum(1).clamp(min=1e-12)).detach()


def dyart_loss(
    logits_clean: torch.Tensor,
    logits_boundary: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    beta: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, CE, margin term): CE(clean) + λ·mean_i(−w_i·φ(x̂_i)); filtered-out points carry w_i = 0.

    The mean runs over the whole batch, as in the paper's code, so fewer kept points mean a smaller margin term.
    """
    ce = F.cross_entropy(logits_clean, labels)
    margin = (-weights * soft_margin(logits_boundary, labels, beta)).sum() / max(len(labels), 1)
    return ce + lam * margin, ce, margin
