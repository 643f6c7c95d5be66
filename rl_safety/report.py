"""report.html: the metrics table, before/after image grids and reward curves (PNG), beside report.json."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from .outputs import METRICS_NAME, atomic_write, atomic_write_text


def grid_indices(num_prompts: int, count: int) -> list[int]:
    """`count` prompt indices spread evenly over a set, so a grid shows more than the first template."""
    count = min(count, num_prompts)
    return sorted({round(i * (num_prompts - 1) / max(count - 1, 1)) for i in range(count)})


def save_grid(images: torch.Tensor, path: Path, scale: int = 3) -> None:
    """One row of images, upscaled with nearest neighbours so 32 px samples stay readable."""
    images = F.interpolate(images, scale_factor=scale, mode="nearest")
    save_image(make_grid(images, nrow=len(images), padding=2, pad_value=1.0), path)


def _read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file (a run killed mid-write leaves a partial last line)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curves(metrics_file: Path, path: Path) -> bool:
    """Reward and per-reward means against the step, from a run's metrics.jsonl; False when there is nothing."""
    from matplotlib.figure import Figure  # not pyplot: no global backend, no display needed

    if not metrics_file.is_file():
        return False
    rows = _read_jsonl(metrics_file)
    keys = ["reward"] + sorted({k for row in rows for k in row if k.startswith("rewards/") and k.endswith("/mean")})
    series = {k: [(row["step"], row[k]) for row in rows if k in row and "step" in row] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    fig = Figure(figsize=(4 * len(series), 3))
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        ax.plot(*zip(*points))
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    return True


def write_report(
    output_dir: Path,
    report: Mapping,
    metrics: Sequence[tuple[str, str, str]],
    grids: Mapping[str, Mapping[str, torch.Tensor]],
    prompt_sets: Mapping[str, Sequence[str]],
    runs: Mapping[str, Path],
    grid_prompts: int,
    title: str | None = None,
) -> Path:
    """Write report.html (and its PNGs under images/) for `report` (report.json's content).

    A model's metric is `{"value": ..., "n": ...}` (evaluation, attack) or a plain number (benchmark).
    `grids[model][set]` holds that set's images seed-major; the grids show the first seed's images of a few prompts.
    `runs` maps adapter names to their training folders, whose metrics.jsonl become reward-curve plots. `title`
    replaces the default heading, "Erasure of <target_concept>".
    """
    images_dir = output_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob("*.png"):  # an overwritten report must not show a previous run's images
        stale.unlink()
    models = list(report["models"])
    # Files are named by position, not by model name: a name may hold characters that break a URL.
    slug = {model: "base" if model == "base" else f"model{i}" for i, model in enumerate(models)}
    esc = html.escape
    heading = esc(title) if title else f"Erasure of <code>{esc(str(report['target_concept']))}</code>"
    parts = [
        "<!doctype html><meta charset='utf-8'><title>rl_safety evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
        "td.n{text-align:right;font-variant-numeric:tabular-nums}</style>",
        f"<h1>{heading}</h1>",
        "<h2>Metrics</h2><table><tr><th>metric</th>" + "".join(f"<th>{esc(m)}</th>" for m in models) + "<th>n</th>"
        "<th>meaning</th></tr>",
    ]
    for metric, _, meaning in metrics:
        cells, count = [], ""
        for model in models:
            entry = report["models"][model].get(metric, {})
            if isinstance(entry, Mapping):
                value = entry.get("value")
                cells.append(f"<td class='n'>{'n/a' if value is None else f'{value:.3f}'}</td>")
                count = entry.get("n", count)
            else:  # a benchmark's plain number, of any scale (a rate, a count, an FID)
                cells.append(f"<td class='n'>{entry:.4g}</td>")
        parts.append(
            f"<tr><td>{esc(metric)}</td>{''.join(cells)}<td class='n'>{count}</td><td>{esc(meaning)}</td></tr>"
        )
    parts.append("</table>")
    settings = report.get("settings", report.get("protocol", {}))
    parts.append(f"<p>Settings: <code>{esc(json.dumps(settings))}</code></p>")
    parts.append("<h2>Samples (first seed; the same initial noise for every model)</h2>")
    for set_name, prompts in prompt_sets.items():
        if not prompts:
            continue
        shown = grid_indices(len(prompts), grid_prompts)
        parts.append(f"<h3>{esc(set_name)}</h3><p>{esc(' | '.join(prompts[i] for i in shown))}</p><table>")
        for model in models:
            file = images_dir / f"{slug[model]}_{set_name}.png"
            save_grid(grids[model][set_name][shown], file)
            parts.append(f"<tr><th>{esc(model)}</th><td><img src='images/{esc(file.name)}'></td></tr>")
        parts.append("</table>")
    curves = []
    for model, run in runs.items():
        file = images_dir / f"{slug[model]}_rewards.png"
        if plot_curves(run / METRICS_NAME, file):
            curves.append(f"<h3>{esc(model)}</h3><img src='images/{esc(file.name)}'>")
    if curves:
        parts.append("<h2>Reward curves (training)</h2>" + "".join(curves))
    path = output_dir / "report.html"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
