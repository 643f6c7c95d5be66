"""`rl-safety eval` with a benchmark recipe (one listing `metrics`): the numbers against the metric run on the cached
images directly, a re-run that samples nothing, prompt sources, baselines and checkpoints against direct sampling,
the attack against a direct `run_attack`, report.html, and bad recipes as one line."""

from __future__ import annotations

import json
import shutil

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


def brightness(report: dict, model: str) -> float:
    return report["models"][model][f"{PLUGIN}/brightness"]


def test_baselines_and_checkpoints_equal_direct_sampling_from_the_same_noise(recipe, tmp_path, tiny_sd_path):
    from rl_safety.evaluation.generate import generate
    from rl_safety.model_config import ModelArguments
    from rl_safety.pipelines import load_pipeline
    from rl_safety.tiny_pipeline import save_tiny_pipeline

    other = save_tiny_pipeline(tmp_path / "other", seed=1)
    fields = dict(baselines=["negative_prompt", "sld"], sld_preset="weak", baseline_concept="a red circle")
    path = recipe(**fields, checkpoints=[str(tiny_sd_path), str(other)])
    assert main(["eval", "--config", path]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["models"]) == ["base", "negative_prompt", "sld", "tiny-sd", "other"]

    pipe = load_pipeline(ModelArguments(str(tiny_sd_path)))
    prompts = ["a red circle", "a blue square", "a green cross"]
    direct = generate(pipe, prompts, [3, 4], 2, 7.5, 0.0, 2, negative_prompt="a red circle")
    assert brightness(report, "negative_prompt") == pytest.approx(direct.mean().item(), rel=1e-5)
    assert brightness(report, "negative_prompt") != pytest.approx(brightness(report, "base"), rel=1e-4)
    assert brightness(report, "sld") == pytest.approx(brightness(report, "base"), rel=1e-5)  # weak waits 15 steps
    assert brightness(report, "tiny-sd") == pytest.approx(brightness(report, "base"), rel=1e-5)  # the same weights
    assert brightness(report, "other") != pytest.approx(brightness(report, "base"), rel=1e-4)
    assert report["protocol"]["baselines"]["sld"] == {"concept": "a red circle", "sld_preset": "weak"}
    assert report["protocol"]["checkpoints"] == [str(tiny_sd_path), str(other)]


def test_changed_baseline_settings_resample_only_their_rows(recipe, tmp_path, monkeypatch):
    fields = dict(baselines=["negative_prompt", "sld"], sld_preset="weak", seeds=[3])
    assert main(["eval", "--config", recipe(**fields)]) == 0
    calls = []
    real = benchmark._sample
    sampler = lambda pipe, *a, **k: "negative_prompt" if "negative_prompt" in k else type(pipe).__name__  # noqa: E731
    monkeypatch.setattr(benchmark, "_sample", lambda *a, **k: calls.append(sampler(*a, **k)) or real(*a, **k))
    again = ["--overwrite_output_dir", "true"]
    assert main(["eval", "--config", recipe(**{**fields, "sld_preset": "max"}), *again]) == 0
    assert calls == ["StableDiffusionPipelineSafe"]  # base and the negative prompt came from the cache
    calls.clear()
    assert (
        main(["eval", "--config", recipe(**{**fields, "sld_preset": "max", "baseline_concept": "blue"}), *again]) == 0
    )
    assert calls == ["negative_prompt", "StableDiffusionPipelineSafe"]


def perturbed_adapter(model, path) -> None:
    """A LoRA adapter on the tiny pipeline that changes its images."""
    from rl_safety.model_config import ModelArguments
    from rl_safety.pipelines import add_lora, load_pipeline, save_lora

    pipe = load_pipeline(ModelArguments(str(model)))
    add_lora(pipe.unet, rank=4, alpha=4.0, target_modules=["to_k", "to_v"], seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    save_lora(pipe.unet, path)


def test_the_attack_fills_base_and_adapter_rows_like_a_direct_run_and_report_html_shows_grids(
    recipe, tmp_path, tiny_sd_path
):
    from rl_safety.attack.run import parse_args, run_attack

    attack = tmp_path / "attack.yaml"
    settings = dict(max_prompts=2, pgd_num_step=1, seeds=[1000], num_inference_steps=2)
    toy = (REPO / "recipes/toyworld/attack.yaml").read_text().splitlines()
    kept = [line for line in toy if not line.startswith(tuple(settings))]
    attack.write_text("\n".join(kept) + "\n" + yaml.safe_dump(settings))
    perturbed_adapter(tiny_sd_path, tmp_path / "erased")
    path = recipe(attack=str(attack), baselines=["negative_prompt"], adapter=[str(tmp_path / "erased")])
    assert main(["eval", "--config", path]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())

    direct = parse_args(["--config", str(attack)])
    direct.pretrained_model_name_or_path, direct.adapter = str(tiny_sd_path), [str(tmp_path / "erased")]
    direct.output_dir = str(tmp_path / "direct")
    expected = run_attack(direct, include_base=True)
    for name in ("base", "erased"):
        row, entry = report["models"][name], expected["models"][name]
        assert row["attack_success_rate"] == entry["attack_success_rate"]["value"]
        assert row["attack_clean_rate"] == entry["clean_rate"]["value"]
    assert "attack_success_rate" not in report["models"]["negative_prompt"]  # baselines are not attacked
    assert report["protocol"]["attack"]["pgd_num_step"] == 1
    assert report["protocol"]["attack"]["num_prompts"] == 2
    assert (tmp_path / "out" / "attack" / "report.json").is_file()

    html = (tmp_path / "out" / "report.html").read_text()
    images = sorted(p.name for p in (tmp_path / "out" / "images").glob("*.png"))
    assert images == ["base_prompts.png", "model1_prompts.png", "model2_prompts.png"]
    assert all(f"images/{name}" in html for name in images)
    assert f"{PLUGIN}/brightness" in html and "attack_success_rate" in html and "a green cross" in html


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
        ({"baselines": ["esd"]}, "baselines=['esd']: each must be one of negative_prompt, sld"),
        ({"baselines": ["sld", "sld"]}, "baselines=['sld', 'sld']: lists a baseline twice"),
        ({"sld_preset": "huge"}, "sld_preset='huge': must be one of weak, medium, strong, max"),
        ({"baseline_concept": " "}, "baseline_concept=' ': must name the concept"),
        ({"checkpoints": ["{tmp}/missing"]}, "checkpoints='{tmp}/missing': no such folder"),
        ({"checkpoints": ["./missing"]}, "checkpoints='./missing': no such folder"),
        ({"checkpoints": ["{tmp}/not_a_pipeline"]}, "checkpoints='{tmp}/not_a_pipeline': no model_index.json"),
        ({"checkpoints": ["{tmp}/base"]}, "checkpoints='{tmp}/base': another model is already named 'base'"),
        ({"checkpoints": ["{model}", "{model}"]}, "checkpoints='{model}': another model is already named 'tiny-sd'"),
        ({"attack": "{tmp}/missing.yaml"}, "attack='{tmp}/missing.yaml': no such attack recipe"),
        ({"attack": "{tmp}/unknown_key.yaml"}, "attack='{tmp}/unknown_key.yaml': unknown recipe key 'pgd_steps'"),
        ({"attack": "{tmp}/bad_value.yaml"}, "attack='{tmp}/bad_value.yaml': epsilon=-1"),
        ({"attack": "{tmp}/broken.yaml"}, "attack='{tmp}/broken.yaml': --config {tmp}/broken.yaml: not valid YAML"),
        ({"attack": "recipes/eval/coco_quality.yaml"}, "unknown recipe key"),
    ],
)
def test_bad_benchmark_recipes_are_one_line(capsys, recipe, tmp_path, tiny_sd_path, fields, expected):
    (tmp_path / "not_a_pipeline").mkdir()
    shutil.copytree(tiny_sd_path, tmp_path / "base")
    (tmp_path / "unknown_key.yaml").write_text("pgd_steps: 3\n")
    (tmp_path / "bad_value.yaml").write_text("epsilon: -1\n")
    (tmp_path / "broken.yaml").write_text("epsilon: [\n")
    fill = {"{tmp}": str(tmp_path), "{model}": str(tiny_sd_path)}

    def filled(value):
        if isinstance(value, list):
            return [filled(v) for v in value]
        for placeholder, text in fill.items():
            value = value.replace(placeholder, text) if isinstance(value, str) else value
        return value

    fields, expected = {key: filled(value) for key, value in fields.items()}, filled(expected)
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
        if config.attack:  # the attack recipe it names parses, and attacks this benchmark's model
            attack = benchmark.attack_config(config)
            assert attack.pretrained_model_name_or_path == config.pretrained_model_name_or_path
            assert attack.output_dir == f"{config.output_dir}/attack" and attack.detector == "nudenet"
