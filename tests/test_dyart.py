"""DyART's math against references: the soft margin's definition, the L∞ projection's optimality, the boundary
search against PGD, the closed-form margin gradient against finite differences, and a short training run."""

from __future__ import annotations

import torch
from torch import nn

from rl_safety.classifiers.baselines import pgd_attack
from rl_safety.classifiers.dyart import (
    closest_boundary_point,
    closest_point_filter,
    dyart_loss,
    h_prime,
    margin_and_input_gradient,
    margin_weights,
    project_linf_box,
    soft_margin,
)


def tiny_mlp(inputs: int, classes: int, seed: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 16), nn.Tanh(), nn.Linear(16, classes)).to(dtype)


def test_soft_margin_is_true_logit_minus_smooth_max_of_the_others():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 0.5]])
    labels = torch.tensor([0, 2])
    beta = 5.0
    expected = torch.tensor(
        [
            2.0 - torch.logsumexp(torch.tensor([5.0, -5.0]), 0).item() / 5,
            0.5 - torch.logsumexp(torch.tensor([0.0, 15.0]), 0).item() / 5,
        ]
    )
    torch.testing.assert_close(soft_margin(logits, labels, beta), expected)
    # Large β: the hard margin z_y − max_{j≠y} z_j.
    torch.testing.assert_close(soft_margin(logits, labels, 1e4), torch.tensor([1.0, -2.5]), atol=1e-3, rtol=0)


def test_linf_projection_without_active_box_is_the_closed_form():
    torch.manual_seed(0)
    points = torch.full((4, 10), 0.5, dtype=torch.float64)
    w = torch.randn(4, 10, dtype=torch.float64)
    b = (w * points).sum(1) + torch.tensor([0.05, -0.05, 0.1, 0.0], dtype=torch.float64)
    d = project_linf_box(points, w, b)
    c = b - (w * points).sum(1)
    torch.testing.assert_close(d, c[:, None] * torch.sign(w) / w.abs().sum(1, keepdim=True))


def test_linf_projection_with_box_is_feasible_and_minimal():
    torch.manual_seed(1)
    points = torch.rand(200, 6, dtype=torch.float64)
    w = torch.randn(200, 6, dtype=torch.float64)
    b = (w * points).sum(1) + torch.randn(200, dtype=torch.float64) * 0.4
    d = project_linf_box(points, w, b)
    moved = points + d
    assert (moved >= -1e-12).all() and (moved <= 1 + 1e-12).all()
    c = b - (w * points).sum(1)
    caps = torch.where(w * torch.sign(c)[:, None] > 0, 1 - points, points)
    reachable = (w.abs() * caps).sum(1)  # the most w·d can change inside the box
    feasible = reachable >= c.abs()
    torch.testing.assert_close((w * moved).sum(1)[feasible], b[feasible])
    # Minimal: with 0.999 of the step's L∞ norm, no feasible step reaches the hyperplane.
    tau = d.abs().amax(1) * 0.999
    best_shorter = (w.abs() * torch.minimum(caps, tau[:, None])).sum(1)
    assert (best_shorter[feasible] < c.abs()[feasible]).all()
    # Infeasible rows go as far as the box allows.
    torch.testing.assert_close((d * w * torch.sign(c)[:, None]).sum(1)[~feasible], reachable[~feasible])


def test_boundary_search_finds_points_near_phi_zero_closer_than_pgd_at_equal_budget():
    model = tiny_mlp(3 * 6 * 6, 4, seed=0).eval()
    torch.manual_seed(2)
    x = torch.rand(64, 3, 6, 6) * 0.6 + 0.2
    with torch.no_grad():
        labels = model(x).argmax(1)  # every point correct: φ > 0
    beta, steps = 5.0, 20
    search = closest_boundary_point(model, x, labels, beta=beta, steps=steps, start_radius=0.01)
    assert search.success.float().mean() > 0.9
    found = search.success
    assert search.phi[found].abs().median() < 0.02
    assert ((search.points - x).abs().flatten(1).amax(1)[found] - search.radius[found]).abs().max() < 1e-6
    # PGD's minimum-norm use at the same 20 gradient evaluations: 4 bisection rounds on ε of 5 PGD steps each.
    low, high = torch.zeros(len(x)), torch.full((len(x),), 0.5)
    pgd_radius = torch.full((len(x),), float("inf"))
    pgd_phi = torch.zeros(len(x))
    for _ in range(4):
        mid = (low + high) / 2
        adv = torch.stack(
            [
                pgd_attack(model, x[i : i + 1], labels[i : i + 1], mid[i].item(), mid[i].item() / 2, 5)[0]
                for i in range(len(x))
            ]
        )
        with torch.no_grad():
            phi = soft_margin(model(adv), labels, beta)
        won = phi < 0
        pgd_radius = torch.where(won, torch.minimum(pgd_radius, mid), pgd_radius)
        pgd_phi = torch.where(won, phi, pgd_phi)
        high, low = torch.where(won, mid, high), torch.where(won, low, mid)
    both = found & torch.isfinite(pgd_radius)
    assert both.sum() > 30
    assert search.radius[both].mean() < 0.8 * pgd_radius[both].mean()
    assert search.phi[both].abs().mean() < pgd_phi[both].abs().mean()


def _radius_along(
    model: nn.Module, x: torch.Tensor, label: torch.Tensor, direction: torch.Tensor, beta: float
) -> float:
    """The distance R at which φ(x + R·direction) = 0, by bisection (φ decreases along the direction here)."""
    low, high = 0.0, 0.5
    with torch.no_grad():
        for _ in range(80):
            mid = (low + high) / 2
            if soft_margin(model(x + mid * direction), label, beta).item() > 0:
                low = mid
            else:
                high = mid
    return (low + high) / 2


def test_closed_form_margin_gradient_matches_finite_differences():
    """∇_θ R = ∇_θ φ(x̂) / ‖∇ₓ φ(x̂)‖₁ at the closest L∞ boundary point, and DyART's loss has exactly −∇_θ R
    (times λ/N) as its gradient when h′ = 1."""
    beta = 5.0
    model = tiny_mlp(5, 3, seed=3, dtype=torch.float64).eval()
    x = torch.full((1, 5), 0.5, dtype=torch.float64)
    with torch.no_grad():
        label = model(x).argmax(1)
    search = closest_boundary_point(model, x, label, beta=beta, steps=300, overshoot=1.0, start_radius=1e-3)
    assert search.success.all()
    _, grad_x = margin_and_input_gradient(model, search.points, label, beta)
    # At the closest L∞ point every coordinate moved by R against the gradient's sign: the direction is fixed.
    direction = -torch.sign(grad_x)
    radius = _radius_along(model, x, label, direction, beta)
    assert abs(search.radius.item() - radius) < 2e-3 * radius
    boundary = x + radius * direction
    _, grad_x = margin_and_input_gradient(model, boundary, label, beta)

    weights = margin_weights(torch.tensor([radius], dtype=torch.float64), grad_x, alpha=0.0, r0=1.0)
    model.zero_grad()
    logits = model(torch.cat([x, boundary]))
    loss, _, margin = dyart_loss(logits[:1], logits[1:], label, weights, beta, lam=1.0)
    margin.backward()
    closed_form = {name: -p.grad.clone() for name, p in model.named_parameters()}  # ∇_θ R

    torch.manual_seed(4)
    params = dict(model.named_parameters())
    v = {name: torch.randn_like(p) for name, p in params.items()}
    h = 1e-5
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for name, p in params.items():
                p.add_(sign * h * v[name])
        values.append(_radius_along(model, x, label, direction, beta))
        with torch.no_grad():
            for name, p in params.items():
                p.sub_(sign * h * v[name])
    finite_difference = (values[0] - values[1]) / (2 * h)
    analytic = sum((closed_form[name] * v[name]).sum() for name in params).item()
    assert abs(analytic - finite_difference) < 1e-4 * max(1.0, abs(finite_difference))


def test_h_prime_and_filters():
    r = torch.tensor([0.0, 0.05, 0.07])
    torch.testing.assert_close(
        h_prime(r, alpha=3.0, r0=16 / 255), torch.tensor([1.0, torch.exp(torch.tensor(-0.15)), 0.0])
    )
    model = tiny_mlp(12, 3, seed=5).eval()
    torch.manual_seed(6)
    x = torch.rand(32, 12) * 0.6 + 0.2
    with torch.no_grad():
        predicted = model(x).argmax(1)
    wrong = (predicted + 1) % 3
    labels = torch.where(torch.arange(32) < 8, wrong, predicted)  # the first 8 are misclassified: φ < 0
    search = closest_boundary_point(model, x, labels, steps=20, start_radius=0.01)
    assert not search.success[:8].any()  # the success filter: nothing to move for a wrong point
    _, grad = margin_and_input_gradient(model, search.points, labels, 5.0)
    keep = closest_point_filter(x, search, grad)
    assert not keep[:8].any() and keep[8:].float().mean() > 0.5
    # A point pushed far past the boundary (φ < −0.3) is not a closest boundary point.
    far = type(search)(
        points=(x + 3 * (search.points - x)).clamp(0, 1),
        radius=search.radius,
        phi=search.phi - 1,
        success=search.success,
    )
    assert not closest_point_filter(x, far, grad).any()
