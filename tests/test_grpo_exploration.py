"""GRPO exploration: part of each concept prompt's group is drawn from the prompt without the concept word, so a
policy that draws the concept in every image still sees concept-free alternatives in its groups."""

import contextlib
import json

import pytest
import torch

from rl_safety.pipelines import adapters_disabled
from rl_safety.sampling import ddim_step_with_logprob
from rl_safety.train import main
from rl_safety.trainers.grpo import drop_words
from tests.conftest import recipe_args
from tests.test_grpo_fixes import build


@pytest.mark.parametrize(
    "prompt, words, expected",
    [
        ("a red circle", ["red"], "a circle"),
        ("A Red circle, red!", ["red"], "A circle, !"),
        ("a reddish circle", ["red"], "a reddish circle"),  # whole words only
        ("a red circle", ["red", "circle"], "a"),
        ("a nude person on a beach", ["nude", "naked"], "a person on a beach"),
    ],
)
def test_drop_words(prompt, words, expected):
    assert drop_words(prompt, words) == expected


def test_exploration_rows_are_the_last_of_each_tagged_group(tiny_sd_path, prompt_file, tmp_path):
    trainer = build(
        tiny_sd_path,
        prompt_file,
        tmp_path,
        num_generations=4,
        per_device_train_batch_size=8,
        explore_generations=1,
        explore_prompts_tags=["unsafe"],
    )
    tags = ["unsafe"] * 4 + ["safe"] * 4
    assert trainer._exploration_rows(tags).tolist() == [False, False, False, True] + [False] * 4
    trainer.args.explore_generations = 2
    assert trainer._exploration_rows(["unsafe"] * 8).tolist() == [False, False, True, True] * 2
    trainer.args.explore_prompts_tags = None  # every prompt, but never the attack's rows
    assert (
        trainer._exploration_rows(["safe"] * 4 + ["adversarial"] * 4).tolist()
        == [False, False, True, True] + [False] * 4
    )


@pytest.mark.parametrize("from_base", [True, False])
def test_explored_rows_follow_the_dropped_prompt_and_carry_the_policys_log_probs(
    tiny_sd_path, prompt_file, tmp_path, from_base
):
    trainer = build(
        tiny_sd_path,
        prompt_file,
        tmp_path,
        num_generations=2,
        per_device_train_batch_size=4,
        explore_generations=1,
        explore_drop_words=["red"],
        explore_from_base=from_base,
    )
    unet = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: the policy is not the base model
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    prompts, tags = ["a red circle"] * 2 + ["a blue square"] * 2, ["unsafe"] * 2 + ["safe"] * 2
    cond = trainer.prompt_encoder(prompts)
    explore = trainer._exploration_rows(tags)
    assert explore.tolist() == [False, True, False, True]
    sample_cond = cond.clone()
    sample_cond[1] = trainer.prompt_encoder(["a circle"])[0]

    explored = trainer._sample(unet, cond, torch.Generator().manual_seed(0), sample_cond, explore)
    plain = trainer._sample(unet, cond, torch.Generator().manual_seed(0))
    with adapters_disabled(unet) if from_base else contextlib.nullcontext():
        behaviour = trainer._sample(unet, sample_cond, torch.Generator().manual_seed(0))

    policy_rows = [0, 2]  # untouched: the same noise gives the same trajectory and log-probs as without it
    for key in ("next_latents", "log_probs"):
        torch.testing.assert_close(explored[key][policy_rows], plain[key][policy_rows], rtol=1e-5, atol=1e-5)
    for row in (1, 3):  # the behaviour's trajectory (row 3: the base model's or the policy's own of its prompt) ...
        torch.testing.assert_close(explored["next_latents"][row], behaviour["next_latents"][row], rtol=1e-5, atol=1e-5)
        if row == 1 or from_base:
            assert not torch.allclose(explored["next_latents"][row], plain["next_latents"][row], atol=1e-3)
        # ... scored by the policy under the real prompt, computed here step by step.
        for k, t in enumerate(trainer.scheduler.timesteps):
            x_t, x_prev = explored["latents"][row : row + 1, k], explored["next_latents"][row : row + 1, k]
            pred = trainer._guided_noise_pred(unet, x_t, t, cond[row : row + 1])
            step = ddim_step_with_logprob(trainer.scheduler, pred, t, x_t, trainer.args.eta, prev_sample=x_prev)
            torch.testing.assert_close(explored["log_probs"][row, k], step.log_prob[0], rtol=1e-5, atol=1e-5)
    # The behaviour's own log-probs of those steps are higher: the steps were drawn from it, not from the policy.
    assert (behaviour["log_probs"][1] > explored["log_probs"][1]).all()


def test_a_run_with_exploration_logs_what_it_adds(tiny_sd_path, tmp_path):
    prompts = tmp_path / "unsafe.txt"
    prompts.write_text("# tag: unsafe\na red circle\na red square\n")
    out = tmp_path / "run"
    argv = recipe_args(tiny_sd_path, prompts, out, explore_generations=1, explore_drop_words=["red"])
    argv += ["--explore_prompts_tags", "unsafe"]
    assert main(argv) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "reward" in line]
    assert [log["explore/share"] for log in logs] == [0.5, 0.5]  # 1 of each group of 2, every prompt tagged
    assert all("explore/reward_gap" in log for log in logs)


def test_the_policy_does_not_explore_a_prompt_without_a_drop_word(tiny_sd_path, tmp_path):
    """Exploring with the policy itself, a prompt without the word would only redraw the policy's own image."""
    prompts = tmp_path / "unsafe.txt"
    prompts.write_text("# tag: unsafe\na red circle\na blue square\n")
    out = tmp_path / "run"
    argv = recipe_args(tiny_sd_path, prompts, out, explore_generations=1, explore_drop_words=["red"])
    argv += ["--explore_from_base", "false", "--max_steps", "1"]
    assert main(argv) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "reward" in line]
    assert logs[0]["explore/share"] == 0.25  # one image of the red circle's group; none of the blue square's
