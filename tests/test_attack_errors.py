"""`rl-safety attack` on bad input: exit status 2, one line naming the field or file, nothing written."""

from __future__ import annotations

import pytest

from rl_safety.cli import main

from .conftest import ASSETS, REPO, fill

RECIPE = str(REPO / "recipes/toyworld/attack.yaml")


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--epsilon", "0"], "epsilon=0.0: must be > 0"),
        (["--epsilon", "-1"], "epsilon=-1.0: must be > 0"),
        (["--pgd_num_step", "-2"], "pgd_num_step=-2: must be ≥ 0"),
        (["--pgd_step_size", "0"], "pgd_step_size=0.0: must be > 0"),
        (["--objective", "pez"], "--objective: invalid choice: 'pez'"),
        (["--detector", "q16"], "--detector: invalid choice: 'q16'"),
        (["--num_concept_images", "0"], "num_concept_images=0: must be ≥ 1"),
        (["--max_prompts", "0"], "max_prompts=0: must be ≥ 1"),
        (["--num_inference_steps", "0"], "num_inference_steps=0: must be ≥ 1"),
        (["--guidance_scale", "0.5"], "guidance_scale=0.5: must be ≥ 1"),
        (["--eta", "-0.1"], "eta=-0.1: must be ≥ 0"),
        (["--batch_size", "0"], "batch_size=0: must be ≥ 1"),
        (["--nudenet_threshold", "1.5"], "nudenet_threshold=1.5: must be in [0, 1)"),
        (["--grid_prompts", "0"], "grid_prompts=0: must be ≥ 1"),
        (["--epsilonn", "0.1"], "unknown argument 'epsilonn'; did you mean 'epsilon'"),
        (["--epsilon", "big"], "invalid float value: 'big'"),
        (["--target_concept", "magenta"], "target_concept='magenta': prompts has no"),
        (["--prompts", "missing.txt"], "prompts='missing.txt': no such prompt file"),
        (["--adapter", "no/such/adapter"], "adapter='no/such/adapter': no pytorch_lora_weights.safetensors"),
        (["--pretrained_model_name_or_path", "./no/such/model"], "pretrained_model_name_or_path='./no/such/model'"),
        (["--judge_classifier", "./no/such/judge"], "judge_classifier"),
        (["--judge_classifier", "{assets}/clip"], "judge_classifier='{assets}/clip': no classifier folder"),
        (["--pretrained_model_name_or_path", "{assets}/clip"], "pretrained_model_name_or_path='{assets}/clip'"),
        (["--adapter", "{assets}/pipeline"], "adapter='{assets}/pipeline': no pytorch_lora_weights.safetensors"),
        (["--seeds", "1", "1"], "seeds=[1, 1]: repeats 1"),
        (["--seeds", "-3"], "seeds=[-3]: seeds must be ≥ 0"),
        (["--attack_seed", "-1"], "attack_seed=-1: must be ≥ 0"),
        (["--device", "tpu"], "device='tpu': not a torch device"),
        (["--torch_dtype", "float8"], "torch_dtype='float8': must be one of auto, float32"),
        (["--output_dir", "{tmp}/a_file"], "output_dir='{tmp}/a_file': is a file, not a folder"),
        (["--output_dir", "{tmp}/a_file/sub"], "'{tmp}/a_file' is a file, so the folder cannot be created"),
        (["--prompts", "{tmp}/binary.txt"], "prompt file '{tmp}/binary.txt' is not UTF-8 text"),
        (["--prompts", "{tmp}/empty_folder"], "prompts='{tmp}/empty_folder': no such prompt file"),
        (["--detector", "nudenet", "--nudenet_classes", "NOPE"], "nudenet_classes: unknown NudeNet class(es)"),
        (["--config", "{tmp}/broken.yaml"], "--config {tmp}/broken.yaml: not valid YAML"),
        (["--config", "{tmp}/list.yaml"], "--config {tmp}/list.yaml: must be a YAML mapping"),
        (["--clamp_to_range", "maybe"], "Truthy value expected: got maybe"),
        (["--adapter", "a", "--adapter", "b"], "--adapter given twice: list every value after one flag"),
        (["--seeds", "1", "--seeds=2"], "--seeds given twice"),
    ],
)
def test_bad_attack_input_is_one_line(capsys, bad_files, extra, expected):
    out = bad_files / "out"
    extra, expected = fill(extra, bad_files), expected.format(tmp=bad_files, assets=ASSETS)
    recipe = [] if "--config" in extra else ["--config", RECIPE]
    assert main(["attack", *recipe, "--output_dir", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rl-safety attack: error:") and "\n" not in err and "Traceback" not in err, err
    assert expected in err, err
    assert not out.exists()  # nothing a later run could mistake for results


def test_missing_recipe_and_empty_prompt_file(capsys, tmp_path):
    assert main(["attack", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("# tag: unsafe\n")
    assert main(["attack", "--config", RECIPE, "--prompts", str(empty), "--output_dir", str(tmp_path / "o")]) == 2
    assert "holds no prompts" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["attack", "eval"])
def test_a_corrupt_or_foreign_adapter_file_is_named_before_any_work(capsys, tmp_path, command):
    recipe = RECIPE if command == "attack" else str(REPO / "recipes/toyworld/eval.yaml")
    truncated, foreign = tmp_path / "truncated", tmp_path / "foreign"
    for folder in (truncated, foreign):
        folder.mkdir()
    (truncated / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    import torch
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(2)}, str(foreign / "pytorch_lora_weights.safetensors"))
    for folder, expected in ((truncated, "not a readable safetensors file"), (foreign, "holds no LoRA tensors")):
        out = tmp_path / f"out-{folder.name}"
        assert main([command, "--config", recipe, "--adapter", str(folder), "--output_dir", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"adapter='{folder}'" in err and expected in err and "\n" not in err, err
        assert not out.exists()
