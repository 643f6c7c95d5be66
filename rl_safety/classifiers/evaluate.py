"""Robustness evaluation by an independent library: clean accuracy, PGD and AutoAttack (torchattacks) per ε.

The attacks are torchattacks' own implementations, not the training code's: a classifier trained against our PGD
or our boundary search is judged by attacks it never saw. AutoAttack is the standard version (APGD-CE, APGD-T,
FAB-T, Square with 5,000 queries) run through torchattacks' `MultiAttack`, so each attack only sees the points the
previous ones failed on.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..outputs import atomic_write, atomic_write_text
from .models import HeadSelect


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of `x` (float in [0, 1]) classified as `y`."""
    correct = 0
    for start in range(0, len(x), batch_size):
        correct += (model(x[start : start + batch_size]).argmax(1) == y[start : start + batch_size]).sum().item()
    return correct / max(len(x), 1)


def autoattack(model: nn.Module, epsilon: float, num_classes: int, seed: int = 0):
    """torchattacks' standard L∞ AutoAttack; below 4 classes APGD-T is left out (its targeted DLR loss reads the
    3rd and 4th largest logits, as in the original AutoAttack) and the other three run as torchattacks' MultiAttack."""
    import torchattacks

    if num_classes >= 4:
        return torchattacks.AutoAttack(
            model, norm="Linf", eps=epsilon, version="standard", n_classes=num_classes, seed=seed
        )
    common = {"eps": epsilon, "norm": "Linf", "seed": seed, "n_restarts": 1}
    return torchattacks.MultiAttack(
        [
            torchattacks.APGD(model, loss="ce", **common),
            torchattacks.FAB(model, multi_targeted=True, n_classes=num_classes, **common),
            torchattacks.Square(model, n_queries=5000, **common),
        ]
    )


def autoattack_name(num_classes: int) -> str:
    """What `autoattack` runs, for the report."""
    if num_classes >= 4:
        return "torchattacks.AutoAttack(norm='Linf', version='standard'): APGD-CE, APGD-T, FAB-T, Square"
    return "torchattacks APGD-CE, FAB-T, Square (MultiAttack; APGD-T needs >= 4 classes)"


def attack_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str,
    epsilon: float,
    num_classes: int,
    pgd_steps: int = 20,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Robust accuracy under torchattacks' `pgd` (L∞, random start, step ε/4) or `autoattack` (standard, L∞)."""
    import torchattacks

    if attack == "pgd":
        atk = torchattacks.PGD(model, eps=epsilon, alpha=epsilon / 4, steps=pgd_steps, random_start=True)
    elif attack == "autoattack":
        atk = autoattack(model, epsilon, num_classes, seed)
    else:
        raise ValueError(f"attack={attack!r}: expected pgd or autoattack")
    torch.manual_seed(seed)  # PGD's random start draws from the global generator
    correct = 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        adv = atk(xb, yb)
        # A guard on the library's output: a point outside the ε-ball or the box would overstate the attack.
        if (adv - xb).abs().max() > epsilon + 1e-5 or adv.min() < -1e-6 or adv.max() > 1 + 1e-6:
            raise RuntimeError(f"{attack} returned points outside the ε-ball or [0, 1]")
        with torch.no_grad():
            correct += (model(adv).argmax(1) == yb).sum().item()
    return correct / max(len(x), 1)


def evaluate_robustness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    class_names: Mapping[str | None, list[str]],
    epsilon: float,
    epsilons: list[float],
    pgd_steps: int = 20,
    autoattack: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    autoattack_epsilons: list[float] | None = None,
) -> dict:
    """report.json's metrics: clean, PGD and AutoAttack accuracy at `epsilon`, a curve over `epsilons`, and per head
    for multi-head models (the top-level numbers are then the mean over heads)."""
    model = model.eval()
    heads = list(class_names)
    # The configured ε joins the curve; a listed radius within 1e-4 of it (0.0314 vs 8/255) is the same point.
    epsilons = sorted({epsilon, *(e for e in epsilons if abs(e - epsilon) > 1e-4)})
    aa_at = [epsilon] if autoattack_epsilons is None else autoattack_epsilons
    epsilons = sorted({*epsilons, *(e for e in aa_at if all(abs(e - f) > 1e-4 for f in epsilons))})
    run_aa = {e: autoattack and any(abs(e - a) <= 1e-4 for a in aa_at) for e in epsilons}
    per_head: dict[str, dict] = {}
    progress = tqdm(total=len(heads) * (len(epsilons) + sum(run_aa.values())), desc="attacks")
    for index, head in enumerate(heads):
        labels = y if y.dim() == 1 else y[:, index]
        wrapped = HeadSelect(model, head).eval()
        curve = []
        for eps in epsilons:
            point = {"epsilon": eps}
            point["pgd_accuracy"] = attack_accuracy(
                wrapped, x, labels, "pgd", eps, len(class_names[head]), pgd_steps, batch_size, seed
            )
            progress.update()
            if run_aa[eps]:
                point["autoattack_accuracy"] = attack_accuracy(
                    wrapped, x, labels, "autoattack", eps, len(class_names[head]), pgd_steps, batch_size, seed
                )
                progress.update()
            curve.append(point)
        at_eps = next(p for p in curve if p["epsilon"] == epsilon)
        per_head[str(head)] = {
            "clean_accuracy": accuracy(wrapped, x, labels, batch_size),
            "pgd_accuracy": at_eps["pgd_accuracy"],
            "autoattack_accuracy": at_eps.get("autoattack_accuracy"),
            "curve": curve,
        }
    progress.close()
    first = per_head[str(heads[0])]
    report = {k: first[k] for k in ("clean_accuracy", "pgd_accuracy", "autoattack_accuracy", "curve")}
    if len(heads) > 1:
        for key in ("clean_accuracy", "pgd_accuracy", "autoattack_accuracy"):
            values = [h[key] for h in per_head.values()]
            report[key] = None if None in values else sum(values) / len(values)
        report["curve"] = [
            {
                k: (v if k == "epsilon" else _mean([h["curve"][i].get(k) for h in per_head.values()]))
                for k, v in p.items()
            }
            for i, p in enumerate(first["curve"])
        ]
        report["heads"] = per_head
    return report


def _mean(values: list) -> float | None:
    return None if None in values else sum(values) / len(values)


def plot_curve(report: Mapping, path: Path) -> None:
    """Robust accuracy against ε (clean accuracy at ε = 0), one line per attack."""
    from matplotlib.figure import Figure  # not pyplot: no global backend, no display needed

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for key, label in (("pgd_accuracy", "PGD"), ("autoattack_accuracy", "AutoAttack")):
        points = [(0.0, report["clean_accuracy"])] + [
            (p["epsilon"] * 255, p[key]) for p in report["curve"] if p.get(key) is not None
        ]
        if len(points) > 1:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.axvline(report["epsilon"] * 255, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("ε (L∞, in 1/255)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title(f"{report['method']} on {Path(str(report['data'])).name}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))


def write_reports(output_dir: Path, report: Mapping) -> None:
    """report.html (metrics table + robust accuracy against ε) and report.json in `output_dir`, atomically;
    report.json last, so it is there only when the whole report is."""
    plot_curve(report, output_dir / "robust_accuracy.png")
    esc = html.escape
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    rows = "".join(
        f"<tr><td class='n'>{p['epsilon'] * 255:.2f}/255</td><td class='n'>{fmt(p.get('pgd_accuracy'))}</td>"
        f"<td class='n'>{fmt(p.get('autoattack_accuracy'))}</td></tr>"
        for p in report["curve"]
    )
    heads = ""
    for head, entry in report.get("heads", {}).items():
        heads += (
            f"<tr><td>{esc(head)}</td><td class='n'>{fmt(entry['clean_accuracy'])}</td>"
            f"<td class='n'>{fmt(entry['pgd_accuracy'])}</td>"
            f"<td class='n'>{fmt(entry['autoattack_accuracy'])}</td></tr>"
        )
    parts = [
        "<!doctype html><meta charset='utf-8'><title>rl_safety classifier robustness</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
        "td.n{text-align:right;font-variant-numeric:tabular-nums}</style>",
        f"<h1>{esc(report['method'])} classifier: robustness</h1>",
        f"<p>Data <code>{esc(str(report['data']))}</code>, architecture <code>{esc(report['architecture'])}</code>, "
        f"{report['num_eval']} evaluation images; attacks from torchattacks "
        f"{esc(report['torchattacks_version'])}.</p>",
        "<table><tr><th>metric</th><th>value</th></tr>",
        f"<tr><td>clean_accuracy</td><td class='n'>{fmt(report['clean_accuracy'])}</td></tr>",
        f"<tr><td>pgd_accuracy (ε = {report['epsilon'] * 255:.2f}/255)</td>"
        f"<td class='n'>{fmt(report['pgd_accuracy'])}</td></tr>",
        f"<tr><td>autoattack_accuracy (ε = {report['epsilon'] * 255:.2f}/255)</td>"
        f"<td class='n'>{fmt(report['autoattack_accuracy'])}</td></tr></table>",
    ]
    if heads:
        parts.append(
            "<h2>Per head</h2><table><tr><th>head</th><th>clean</th><th>PGD</th><th>AutoAttack</th></tr>"
            + heads
            + "</table>"
        )
    parts += [
        "<h2>Robust accuracy against ε</h2><img src='robust_accuracy.png'>",
        f"<table><tr><th>ε</th><th>PGD</th><th>AutoAttack</th></tr>{rows}</table>",
        f"<p>Settings: <code>{esc(json.dumps(report['attacks']))}</code></p>",
    ]
    atomic_write_text(output_dir / "report.html", "\n".join(parts) + "\n")
    atomic_write_text(output_dir / "report.json", json.dumps(report, indent=2) + "\n")
