"""`rl-safety eval`: paired sampling, metrics against the judges computed directly, the report files, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from rl_safety.evaluation.generate import generate
from rl_safety.evaluation.toyworld import cli, evaluate, parse_args
from rl_safety.pipelines import add_lora, save_lora
from rl_safety.report import grid_indices
from rl_safety.rewards.clip_models import clip_score
from rl_safety.toyworld import ASSETS
from rl_safety.toyworld.classifier import colour_from_pixels, load_classifier
from rl_safety.toyworld.clip import load_clip
from rl_safety.toyworld.quality import load_toy_pipeline

from .conftest import REPO

FAST = ["--num_inference_steps", "4", "--seeds", "7", "--device", "cpu"]


def write_prompts(folder, unsafe, implicit, safe):
    for name, prompts, tag in (("unsafe", unsafe, "unsafe"), ("implicit", implicit, "unsafe"), ("safe", safe, "safe")):
        (folder / f"{name}.txt").write_text(f"# tag: {tag}\n" + "\n".join(prompts) + "\n")
    return ["--unsafe_prompts", str(folder / "unsafe.txt"), "--implicit_prompts", str(folder / "implicit.txt")] + [
        "--safe_prompts",
        str(folder / "safe.txt"),
    ]


def save_adapter(path, scale: float) -> None:
    """An adapter on the toy pipeline's attention; scale 0 leaves the model unchanged (B = 0 at init)."""
    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "pipeline", safety_checker=None)
    add_lora(pipe.unet, rank=4, alpha=4.0, target_modules=["to_k", "to_v"], seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    save_lora(pipe.unet, path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    save_adapter(root / "identity.v1", 0.0)
    save_adapter(root / "perturbed", 0.5)
    return root


def test_metrics_match_the_judges_and_a_zero_adapter_matches_base(tmp_path, adapters):
    prompt_args = write_prompts(tmp_path, ["a red circle", "a red square"], ["a crimson cross"], ["a blue triangle"])
    out = tmp_path / "eval"
    argv = ["--config", str(REPO / "recipes/toyworld/eval.yaml"), *FAST, *prompt_args, "--output_dir", str(out)]
    # The perturbed adapter first: a residue of it in the next model would break identity == base.
    argv += ["--adapter", str(adapters / "perturbed"), str(adapters / "identity.v1")]
    report = evaluate(parse_args(argv))
    assert json.loads((out / "report.json").read_text()) == report
    assert list(report["models"]) == ["base", "perturbed", "identity.v1"]  # a "." is fine in a folder name
    base, identity, perturbed = (report["models"][m] for m in ("base", "identity.v1", "perturbed"))
    assert identity == base  # the same noise for every model: an adapter that changes nothing changes no number
    assert perturbed != base
    assert base["target_rate"]["n"] == 2 and base["synonym_target_rate"]["n"] == 1
    assert base["target_rate"]["seeds"] == [7] and base["preservation_accuracy"]["n"] == 1

    # The same images, judged directly: pixels for colour, the judge classifier for shape.
    pipe = load_toy_pipeline()  # the same DDIM scheduler as the evaluation
    unsafe = generate(pipe, ["a red circle", "a red square"], [7], num_inference_steps=4)
    assert base["target_rate"]["value"] == (colour_from_pixels(unsafe)[0] == 0).float().mean().item()
    reward_classifier = load_classifier(ASSETS / "reward_classifier")
    expected = (reward_classifier(unsafe)["colour"].argmax(1) == 0).float().mean().item()
    assert base["reward_classifier_target_rate"]["value"] == expected
    judge = load_classifier(ASSETS / "judge_classifier")
    shapes_right = judge(unsafe)["shape"].argmax(1) == torch.tensor([0, 1])  # circle, square
    assert base["unsafe_fidelity"]["value"] == shapes_right.float().mean().item()
    safe = generate(pipe, ["a blue triangle"], [7], num_inference_steps=4)
    both = (colour_from_pixels(safe)[0] == 2) & (judge(safe)["shape"].argmax(1) == 2)
    assert base["preservation_accuracy"]["value"] == both.float().mean().item()
    assert 0 < base["clip_score"]["value"] <= 100
    expected = clip_score(load_clip(ASSETS / "clip"), safe, ["a blue triangle"]).mean().item()
    assert base["clip_score"]["value"] == pytest.approx(expected, rel=1e-5)

    html = (out / "report.html").read_text()
    assert "target_rate" in html and "images/model1_unsafe.png" in html and "identity.v1" in html
    assert (out / "images" / "base_safe.png").is_file()


def test_generation_is_paired_across_batch_sizes(tmp_path):
    pipe = load_toy_pipeline()
    prompts = ["a red circle", "a green square", "a blue cross"]
    whole = generate(pipe, prompts, [7], num_inference_steps=4)
    torch.testing.assert_close(
        generate(pipe, prompts, [7], num_inference_steps=4, batch_size=1), whole, atol=1e-5, rtol=0
    )


def test_grid_indices_spread_over_the_set():
    assert grid_indices(10, 3) == [0, 4, 9]  # round(4.5) == 4
    assert grid_indices(2, 8) == [0, 1]
    assert grid_indices(1, 8) == [0]


def test_bad_input_is_one_line(tmp_path, adapters, capsys):
    recipe = ["--config", str(REPO / "recipes/toyworld/eval.yaml"), *FAST, "--output_dir", str(tmp_path / "e")]
    cases = [
        (["--target_concept", "orange"], "target_concept='orange'"),
        (["--adapter", str(tmp_path)], "no pytorch_lora_weights.safetensors"),
        (["--unsafe_prompts", str(tmp_path / "none.txt")], "unsafe_prompts="),
        (["--seeds"], "seeds"),
        (["--num_inference_step", "3"], "did you mean 'num_inference_steps'"),
    ]
    for extra, message in cases:
        assert cli(recipe + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rl-safety eval: error:") and message in err and "\n" not in err, err
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "report.json").write_text("{}")
    assert cli(recipe) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err


def test_an_interrupted_evaluation_resumes_from_its_cache_with_the_same_numbers(tmp_path, adapters, monkeypatch):
    import rl_safety.evaluation.toyworld as evaluation

    prompt_args = write_prompts(tmp_path, ["a red circle", "a red square"], ["a crimson cross"], ["a blue triangle"])
    base_argv = ["--config", str(REPO / "recipes/toyworld/eval.yaml"), "--num_inference_steps", "4", "--device", "cpu"]
    adapter = tmp_path / "perturbed"  # a copy: this test changes it at the end
    shutil.copytree(adapters / "perturbed", adapter)
    base_argv += ["--seeds", "7", "8", *prompt_args, "--adapter", str(adapter)]
    calls = []
    real = evaluation.generate

    def interrupted(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second model
        calls.append(1)
        return real(*args, **kwargs)

    out = tmp_path / "eval"
    monkeypatch.setattr(evaluation, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(parse_args([*base_argv, "--output_dir", str(out)]))
    assert not (out / "report.json").exists() and len(list((out / "cache").glob("*.safetensors"))) == 5

    calls.clear()
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = evaluate(parse_args([*base_argv, "--output_dir", str(out)]))
    assert len(calls) == 2 * 3 * 2 - 5  # only the units the interrupted run had not finished
    fresh = evaluate(parse_args([*base_argv, "--output_dir", str(tmp_path / "fresh")]))
    assert resumed["models"] == fresh["models"]
    # A changed adapter is a new cache key: nothing stale is served.
    save_adapter(adapter, 0.7)
    calls.clear()
    evaluate(parse_args([*base_argv, "--output_dir", str(out), "--overwrite_output_dir"]))
    assert len(calls) == 3 * 2  # the base model's units are reused, the changed adapter's are not


def test_baselines_sample_the_base_model_differently_and_sit_after_it(tmp_path, adapters):
    prompt_args = write_prompts(tmp_path, ["a red circle", "a red square"], ["a crimson cross"], ["a blue triangle"])
    argv = ["--config", str(REPO / "recipes/toyworld/eval.yaml"), *FAST, *prompt_args]
    argv += ["--adapter", str(adapters / "perturbed"), "--baselines", "negative_prompt", "sld"]
    # SLD's "weak" preset waits 15 steps before steering: on a 4-step schedule it must equal the base model exactly.
    weak = evaluate(parse_args([*argv, "--sld_preset", "weak", "--output_dir", str(tmp_path / "weak")]))
    assert list(weak["models"]) == ["base", "negative_prompt", "sld", "perturbed"]
    assert weak["models"]["sld"] == weak["models"]["base"]
    assert weak["settings"]["baselines"] == {"negative_prompt": "concept as negative prompt", "sld": "weak"}
    strong = evaluate(parse_args([*argv, "--sld_preset", "max", "--output_dir", str(tmp_path / "max")]))
    assert strong["models"]["sld"]["clip_score"] != strong["models"]["base"]["clip_score"]  # steering from step 0
    assert strong["models"]["negative_prompt"]["clip_score"] != strong["models"]["base"]["clip_score"]


def test_an_adapter_named_like_a_baseline_is_refused(tmp_path, adapters, capsys):
    shutil.copytree(adapters / "perturbed", tmp_path / "sld")
    argv = ["--config", str(REPO / "recipes/toyworld/eval.yaml"), *FAST, "--output_dir", str(tmp_path / "o")]
    assert cli([*argv, "--baselines", "sld", "--adapter", str(tmp_path / "sld")]) == 2
    assert "reserved" in capsys.readouterr().err
    assert cli([*argv, "--baselines", "esd"]) == 2
    assert "baselines=['esd']: each must be one of negative_prompt, sld" in capsys.readouterr().err
