"""`adv_train` (RACE) inside the trainers: the pool refreshes on schedule, its rows reach the rollouts, a resumed run
ends with the adapter of an uninterrupted one, and a recipe without concept prompts is refused in one line."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from rl_safety.train import cli, main
from tests.conftest import recipe_args
from tests.test_refl_trainer import refl_args

ADV = {"adv_train": "true", "adv_refresh_steps": 2, "adv_share": 1.0, "pgd_num_step": 2, "adv_epsilon": 0.3}


def _prompts(tmp_path):
    path = tmp_path / "unsafe.txt"
    path.write_text("# tag: unsafe\na red circle\na red square\n")
    safe = tmp_path / "safe.txt"
    safe.write_text("# tag: safe\na blue circle\na green square\n")
    return [path, safe]


def test_grpo_adv_train_refreshes_on_schedule_and_resumes_exactly(tiny_sd_path, tmp_path):
    prompts = _prompts(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    args = dict(max_steps=3, save_steps=1, **ADV)
    main(recipe_args(tiny_sd_path, prompts, full, **args))
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    refreshed = [row["step"] for row in rows if "adversarial/attack_loss" in row]
    assert refreshed == [1, 3]  # refreshes at global steps 0 and 2, logged after those optimizer steps
    assert any(row.get("adversarial/share", 0) > 0 for row in rows)  # adv_share 1: every concept row
    assert (full / "checkpoint-2" / "adversarial_pool.safetensors").is_file()

    # Resume from step 1: the pool found at step 0 must come back from the checkpoint (a fresh refresh at step 1,
    # against another policy, would change what steps 2 and 3 train on).
    main(recipe_args(tiny_sd_path, prompts, part, **args, resume_from_checkpoint=str(full / "checkpoint-1")))
    a, b = load_file(full / "pytorch_lora_weights.safetensors"), load_file(part / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refl_adv_train_runs_with_adversarial_rows(tiny_sd_path, tmp_path):
    out = tmp_path / "refl"
    assert main(refl_args(tiny_sd_path, _prompts(tmp_path), out, max_steps=2, **ADV)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "adversarial/attack_loss" in rows[0]


def test_adv_train_without_concept_prompts_is_one_line(tiny_sd_path, prompt_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(recipe_args(tiny_sd_path, prompt_file, out, **ADV)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rl-safety train: error: adv_prompts_tag='unsafe'") and "\n" not in err


def test_esd_adv_train_conditions_the_trained_prediction_on_the_pool(tiny_sd_path, tmp_path):
    from tests.test_esd_trainer import esd_args

    plain, adv = tmp_path / "plain", tmp_path / "adv"
    unsafe = _prompts(tmp_path)[0]
    assert main(esd_args(tiny_sd_path, unsafe, plain)) == 0
    assert main(esd_args(tiny_sd_path, unsafe, adv, **{**ADV, "adv_refresh_steps": 1})) == 0
    rows = [json.loads(line) for line in (adv / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "adversarial/attack_loss" in row] == [1, 2]
    assert all(row["adversarial/share"] == 1.0 for row in rows if "adversarial/share" in row)
    # Same seed, same draws: only the conditioning of e_n differs, and it changes what is learned.
    a, b = load_file(plain / "pytorch_lora_weights.safetensors"), load_file(adv / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
