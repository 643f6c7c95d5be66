"""The metric contract and the name lookup: how an evaluation measures images, and how plugins add measures.

A metric is a `torchmetrics.Metric`: `update(images, prompts)` with images as floats in [0, 1], shape (B, 3, H, W),
accumulates one batch; `compute()` returns the report's numbers as a flat dict of floats (e.g. `{"rate": 0.12,
"count/FEMALE_BREAST_EXPOSED": 3}`); `reset()` starts the next model or prompt set. torchmetrics keeps the states in
sync across processes, so a metric computed under `accelerate launch` sees every process's images. `protocol()` says
what decides the numbers (model, classes, thresholds, counting unit, library versions) and is written into the report
beside them, so two reports are comparable only when their protocols match.

Metrics are found by name like rewards: the built-ins below, then entry points in group `rl_safety.metrics`, then a
`package.module:attr` path.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

import torch
from torchmetrics import Metric

from ..errors import ConfigError

ENTRY_POINT_GROUP = "rl_safety.metrics"

# Built-ins by import path: a metric's heavy dependencies (NudeNet, CLIP weights) load only when a recipe names it.
BUILTIN_METRICS = {
    "nudity": "rl_safety.evaluation.nudity:NudityRate",
    "q16": "rl_safety.evaluation.q16:Q16Rate",
    "inappropriate": "rl_safety.evaluation.q16:InappropriateRate",
    "clip_score": "rl_safety.evaluation.quality:ClipScore",
    "image_reward": "rl_safety.evaluation.quality:ImageRewardScore",
    "fid": "rl_safety.evaluation.quality:FrechetDistance",
}


class MetricError(ConfigError):
    """A metric could not be resolved or built from a recipe's entry."""


class EvaluationMetric(Metric):
    """A torchmetrics `Metric` that also states its protocol. Subclasses implement `update(images, prompts)`,
    `compute() -> dict[str, float]` and `protocol() -> dict`."""

    full_state_update = False

    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def protocol(self) -> dict[str, Any]:
        """Everything that decides this metric's numbers; written into the report."""
        return {"metric": type(self).__name__}


def available_metrics() -> list[str]:
    """Names usable in an evaluation recipe: built-ins, then plugins registered as `rl_safety.metrics` entry points."""
    return sorted(BUILTIN_METRICS) + sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def resolve_metric(name: str) -> Any:
    """The factory for `name`: a built-in, an entry point in group `rl_safety.metrics`, or `package.module:attr`."""
    path = BUILTIN_METRICS.get(name)
    if path is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                return ep.load()
    if path is None and ":" not in name:
        raise MetricError(
            f"unknown metric {name!r}; valid names: {', '.join(available_metrics())}, or a 'package.module:attr' path"
        )
    module_name, _, attr = (path or name).partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise MetricError(f"metric {name!r}: cannot import it ({err})") from err
    if not callable(factory):
        raise MetricError(f"metric {name!r}: a {type(factory).__name__}, not a metric class")
    return factory


def build_metric(name: str, args: Mapping[str, Any] | None = None) -> Metric:
    """The metric `name` built with `args` (a recipe's `metrics: [{name, args}]` entry)."""
    if args is not None and not isinstance(args, Mapping):
        raise MetricError(f"metric {name!r}: args={args!r} must be a mapping of argument: value")
    factory = resolve_metric(name)
    try:
        metric = factory(**dict(args or {}))
    except TypeError as err:
        raise MetricError(f"metric {name!r}: bad args {sorted(args or {})} ({err})") from err
    if not all(callable(getattr(metric, method, None)) for method in ("update", "compute", "reset")):
        raise MetricError(f"metric {name!r}: built a {type(metric).__name__}, which has no update/compute/reset")
    return metric
