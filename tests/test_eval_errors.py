"""`rl-safety eval` on bad input: exit status 2, one line naming the field or file, nothing written."""

from __future__ import annotations

import pytest

from rl_safety.cli import main

from .conftest import ASSETS, REPO, fill

RECIPE = str(REPO / "recipes/toyworld/eval.yaml")


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--num_inference_steps", "0"], "num_inference_steps=0: must be ≥ 1"),
        (["--adapter", "a", "--adapter", "b"], "--adapter given twice: list every value after one flag"),
        (["--batch_size", "0"], "batch_size=0: must be ≥ 1"),
        (["--eta", "-1"], "eta=-1.0: must be ≥ 0"),
        (["--grid_prompts", "0"], "grid_prompts=0: must be ≥ 1"),
        (["--baselines", "esd"], "baselines=['esd']: each must be one of negative_prompt, sld"),
        (["--sld_preset", "huge"], "sld_preset='huge': must be one of weak, medium, strong, max"),
        (["--target_concept", "magenta"], "target_concept='magenta': unsafe_prompts has no"),
        (["--target_concept", "Red"], "target_concept='Red'"),
        (["--unsafe_prompts", "missing.txt"], "unsafe_prompts='missing.txt'"),
        (["--safe_prompts", "missing.txt"], "safe_prompts='missing.txt'"),
        (["--implicit_prompts", "missing.txt"], "implicit_prompts='missing.txt'"),
        (["--adapter", "no/such/adapter"], "adapter='no/such/adapter': no pytorch_lora_weights.safetensors"),
        (["--judge_classifier", "./no/judge"], "judge_classifier='./no/judge'"),
        (["--reward_classifier", "./no/clf"], "reward_classifier='./no/clf'"),
        (["--clip_model", "./no/clip"], "clip_model='./no/clip'"),
        (["--pretrained_model_name_or_path", "./no/model"], "pretrained_model_name_or_path='./no/model'"),
        (["--seeds", "x"], "invalid int value: 'x'"),
        (["--num_inference_step", "4"], "unknown argument 'num_inference_step'"),
        (["--guidance_scale", "many"], "invalid float value: 'many'"),
        (["--guidance_scale", "0.5"], "guidance_scale=0.5: must be ≥ 1"),
        (["--seeds", "1", "1"], "seeds=[1, 1]: repeats 1; list each seed once"),
        (["--seeds", "-1"], "seeds=[-1]: seeds must be ≥ 0"),
        (["--seeds"], "argument --seeds: expected at least one argument"),
        (["--device", "tpu"], "device='tpu': not a torch device"),
        (["--output_dir", "{tmp}/a_file"], "output_dir='{tmp}/a_file': is a file, not a folder"),
        (["--output_dir", "{tmp}/a_file/sub"], "'{tmp}/a_file' is a file, so the folder cannot be created"),
        (["--unsafe_prompts", "{tmp}/binary.txt"], "prompt file '{tmp}/binary.txt' is not UTF-8 text"),
        (["--safe_prompts", "{tmp}/empty_folder"], "safe_prompts='{tmp}/empty_folder': no such prompt file"),
        (["--judge_classifier", "{tmp}/empty_folder"], "judge_classifier='{tmp}/empty_folder': cannot load"),
        (["--judge_classifier", "{assets}/clip"], "judge_classifier='{assets}/clip': cannot load"),
        (["--clip_model", "{assets}/judge_classifier"], "clip_model='{assets}/judge_classifier': cannot load"),
        (["--reward_classifier", "{assets}/pipeline"], "reward_classifier='{assets}/pipeline': cannot load"),
        (["--pretrained_model_name_or_path", "{assets}/clip"], "pretrained_model_name_or_path='{assets}/clip'"),
        (["--adapter", "{assets}/pipeline"], "adapter='{assets}/pipeline': no pytorch_lora_weights.safetensors"),
        (["--config", "{tmp}/broken.yaml"], "--config {tmp}/broken.yaml: not valid YAML"),
        (["--config", "{tmp}/list.yaml"], "--config {tmp}/list.yaml: must be a YAML mapping"),
        (["--overwrite_output_dir", "maybe"], "Truthy value expected: got maybe"),
    ],
)
def test_bad_eval_input_is_one_line(capsys, bad_files, extra, expected):
    out = bad_files / "out"
    extra, expected = fill(extra, bad_files), expected.format(tmp=bad_files, assets=ASSETS)
    recipe = [] if "--config" in extra else ["--config", RECIPE]
    assert main(["eval", *recipe, "--output_dir", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rl-safety eval: error:") and "\n" not in err and "Traceback" not in err, err
    assert expected in err, err
    assert not (out / "report.json").exists()


def test_an_existing_report_is_not_overwritten(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    assert main(["eval", "--config", RECIPE, "--output_dir", str(out)]) == 2
    assert "holds a report; pass --overwrite_output_dir" in capsys.readouterr().err
    assert (out / "report.json").read_text() == "{}"
