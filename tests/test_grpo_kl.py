"""GRPO's KL to the base model, on every row or on the rows of chosen tags (`beta_prompts_tags`)."""

import json

import pytest
import torch

from rl_safety.pipelines import adapters_disabled
from rl_safety.sampling import ddim_step_with_logprob, gaussian_kl
from rl_safety.train import main
from tests.conftest import recipe_args
from tests.test_grpo_fixes import build


def hand_kl(trainer, inputs, row: int) -> torch.Tensor:
    """The KL of one row's first trained step, from the policy's and the base model's predictions."""
    unet, j = trainer.model, 0
    k = int(inputs["train_steps"][row, j])
    x_t, x_prev = inputs["latents"][row : row + 1, k], inputs["next_latents"][row : row + 1, k]
    t, cond = trainer.scheduler.timesteps[k], inputs["cond"][row : row + 1]
    eta = trainer.args.eta
    policy = ddim_step_with_logprob(
        trainer.scheduler, trainer._guided_noise_pred(unet, x_t, t, cond), t, x_t, eta, prev_sample=x_prev
    )
    with adapters_disabled(unet):
        base_pred = trainer._guided_noise_pred(unet, x_t, t, cond)
    base = ddim_step_with_logprob(trainer.scheduler, base_pred, t, x_t, eta, prev_sample=x_prev)
    return gaussian_kl(policy.mean, base.mean, policy.std)[0]


@pytest.mark.parametrize("wanted, rows", [(["safe"], [2, 3]), (None, [0, 1, 2, 3]), (["unsafe"], [0, 1])])
def test_the_kl_applies_to_the_rows_of_the_chosen_tags(tiny_sd_path, prompt_file, tmp_path, wanted, rows):
    beta = 0.5
    trainer = build(
        tiny_sd_path, prompt_file, tmp_path, per_device_train_batch_size=4, beta=beta, beta_prompts_tags=wanted
    )
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter, so the policy differs from the base model
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    trainer._step = 0
    batch = [{"prompt": "a red circle", "tag": "unsafe"}] * 2 + [{"prompt": "a blue square", "tag": "safe"}] * 2
    with torch.no_grad():
        inputs = trainer._generate_and_score_completions(batch)
        inputs["advantages"] = torch.zeros(4)  # the clipped term vanishes: the loss is the KL term alone
        loss = trainer._compute_loss(trainer.model, inputs, 0)
        kls = torch.stack([hand_kl(trainer, inputs, row) for row in range(4)])
    assert inputs["kl_rows"].tolist() == [row in rows for row in range(4)]
    assert (kls > 0).all()
    torch.testing.assert_close(loss, beta * kls[rows].sum() / 4, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.tensor(trainer._metrics["kl"][-1]), kls[rows].mean(), rtol=1e-4, atol=1e-7)


def test_a_run_with_the_kl_on_safe_prompts_logs_it(tiny_sd_path, tmp_path):
    safe, unsafe = tmp_path / "safe.txt", tmp_path / "unsafe.txt"
    safe.write_text("# tag: safe\na blue square\n")
    unsafe.write_text("# tag: unsafe\na red circle\n")
    out = tmp_path / "run"
    argv = recipe_args(tiny_sd_path, [safe, unsafe], out, beta=0.1, learning_rate=0.05)
    argv += ["--beta_prompts_tags", "safe"]
    assert main(argv) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "reward" in line]
    assert logs[0]["kl"] == 0  # before the first update the policy is the base model
    assert logs[-1]["kl"] > 0
