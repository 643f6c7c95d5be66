"""The metric contract's lookup: built-in names, import paths and one-line errors for bad entries."""

from __future__ import annotations

import pytest
import torch

from rl_safety.evaluation.metrics import EvaluationMetric, MetricError, available_metrics, build_metric


class MeanBrightness(EvaluationMetric):
    """A plugin as a user would write one: the mean pixel value over every image seen."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, images, prompts):
        self.total += images.mean(dim=(1, 2, 3)).sum()
        self.count += len(images)

    def compute(self):
        return {"brightness": self.scale * (self.total / self.count).item()}


def test_an_import_path_plugin_accumulates_over_batches_and_resets():
    metric = build_metric("tests.test_evaluation_metrics:MeanBrightness", {"scale": 2.0})
    metric.update(torch.zeros(2, 3, 4, 4), ["a", "b"])
    metric.update(torch.ones(1, 3, 4, 4), ["c"])
    assert metric.compute() == {"brightness": pytest.approx(2.0 / 3)}
    metric.reset()
    metric.update(torch.ones(1, 3, 4, 4), ["c"])
    assert metric.compute() == {"brightness": 2.0}


@pytest.mark.parametrize(
    "name, args, expected",
    [
        ("fidd", None, "unknown metric 'fidd'; valid names: clip_score, fid"),
        ("os:path", None, "metric 'os:path': a module, not a metric class"),
        ("no.such.module:X", None, "metric 'no.such.module:X': cannot import it"),
        ("tests.test_evaluation_metrics:MeanBrightness", {"gain": 1}, "bad args ['gain']"),
        ("tests.test_evaluation_metrics:MeanBrightness", [1], "args=[1] must be a mapping"),
        ("torch:zeros", {}, "metric 'torch:zeros': bad args"),
    ],
)
def test_bad_metric_entries_are_one_line(name, args, expected):
    with pytest.raises(MetricError) as info:
        build_metric(name, args)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_built_in_names_are_listed():
    assert {"nudity", "q16", "inappropriate", "clip_score", "image_reward", "fid"} <= set(available_metrics())
