"""`rl-safety eval` with a benchmark recipe (one listing `metrics`): the numbers against the metric run on the cached
images directly, a re-run that samples nothing, prompt sources, and bad recipes as one line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import rl_safety.evaluation.benchmark as benchmark
from rl_safety.cli import main

from .conftest import REPO

PLUGIN = "tests.test_evaluation_metrics:MeanBrightness"


@pytest.fixture
def recipe(tmp_path, tiny_sd_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green cross\n")

    def write(**fields):
        base = {
            "pretrained_model_name_or_path": str(tiny_sd_path),
            "prompt_source": "file",
            "prompts": str(prompts),
            "seeds": [3, 4],
            "num_inference_steps": 2,
            "batch_size": 2,
            "device": "cpu",
            "metrics": [{"name": PLUGIN}],
            "output_dir": str(tmp_path / "out"),
        }
        base.update(fields)
        path = tmp_path / "benchmark.yaml"
        path.write_text(yaml.safe_dump(base))
        return str(path)

    return write


def test_the_report_is_the_metric_on_the_sampled_images_and_a_rerun_samples_nothing(recipe, tmp_path, monkeypatch):
    path = recipe()
    assert main(["eval", "--config", path]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    cached = torch.cat([load_file(f)["images"] for f in sorted((tmp_path / "out" / "cache").glob("*.safetensors"))])
    assert len(cached) == 2 * 3
    assert report["models"]["base"][f"{PLUGIN}/brightness"] == pytest.approx(cached.mean().item(), rel=1e-5)
    assert report["protocol"]["num_prompts"] == 3 and report["protocol"]["seeds"] == [3, 4]

    calls = []
    real = benchmark._sample
    monkeypatch.setattr(benchmark, "_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    alias = [{"name": PLUGIN, "alias": "bright", "args": {"scale": 2.0}}]
    assert main(["eval", "--config", recipe(metrics=alias), "--overwrite_output_dir", "true"]) == 0
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert calls == []  # every (model, seed) unit came from the cache
    assert again["models"]["base"]["bright/brightness"] == pytest.approx(2 * cached.mean().item(), rel=1e-5)


def test_i2p_prompts_of_a_category(recipe, tmp_path):
    csv = REPO / "tests/fixtures/i2p_sample.csv"
    path = recipe(prompt_source="i2p", prompts=str(csv), categories=["sexual"], seeds=[0])
    assert main(["eval", "--config", path]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    from rl_safety.evaluation.i2p import load_i2p

    assert report["protocol"]["num_prompts"] == len(load_i2p(csv, "sexual")) > 0


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"metrics": []}, "metrics=[]: must list at least one"),
        ({"metrics": [{"name": "fidd"}]}, "unknown metric 'fidd'"),
        ({"metrics": [{"name": PLUGIN}, {"name": PLUGIN}]}, "appears twice; give one of them an 'alias'"),
        ({"metrics": [{"name": PLUGIN, "weight": 1}]}, "metrics[0]: unknown keys ['weight']"),
        ({"metrics": [{"name": PLUGIN, "args": {"gain": 2}}]}, "bad args ['gain']"),
        ({"prompt_source": "laion"}, "prompt_source"),
        ({"prompts": "missing.txt"}, "prompts='missing.txt': no such prompt file"),
        ({"seeds": [1, 1]}, "seeds=[1, 1]: repeats 1"),
        ({"guidance_scale": 0.5}, "guidance_scale=0.5: must be ≥ 1"),
        ({"pretrained_model_name_or_path": "./no/model"}, "pretrained_model_name_or_path='./no/model'"),
    ],
)
def test_bad_benchmark_recipes_are_one_line(capsys, recipe, tmp_path, fields, expected):
    assert main(["eval", "--config", recipe(**fields)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rl-safety eval: error:") and "\n" not in err and "Traceback" not in err, err
    assert expected in err, err
    assert not (tmp_path / "out" / "report.json").exists()


def test_the_shipped_benchmark_recipes_parse():
    from rl_safety.evaluation.benchmark_config import BenchmarkConfig
    from rl_safety.recipe_parser import RecipeParser

    for name in ("i2p_nudity", "coco_quality"):
        (config,) = RecipeParser((BenchmarkConfig,)).parse(["--config", str(REPO / f"recipes/eval/{name}.yaml")])
        assert config.metrics and config.pretrained_model_name_or_path == "CompVis/stable-diffusion-v1-4"
