"""ReFL's anchor loss: the distance of the adapter's guided noise predictions from the base model's, on the rows of
chosen tags, added to the reward loss with its weight."""

import pytest
import torch

from rl_safety.pipelines import adapters_disabled
from tests.test_refl_trainer import build

ROWS = [{"prompt": "a red circle", "tag": "unsafe"}] * 2 + [{"prompt": "a blue square", "tag": "safe"}] * 2


def perturbed(trainer):
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter, so the policy differs from the base model
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    return trainer


def test_the_anchor_is_the_prediction_distance_on_the_chosen_rows(tiny_sd_path, prompt_file, tmp_path):
    trainer = perturbed(build(tiny_sd_path, prompt_file, tmp_path, anchor_loss_weight=1.0))
    unet = trainer.model
    latents = torch.randn(4, *trainer.latent_shape, generator=torch.Generator().manual_seed(1))
    cond = trainer.prompt_encoder([row["prompt"] for row in ROWS])
    t = trainer.scheduler.timesteps[1]
    with torch.no_grad():
        value = trainer._anchor_loss(unet, latents, t, cond, [2, 3], 4)
        policy = trainer._guided_noise_pred(unet, latents, t, cond)
        with adapters_disabled(unet):
            base = trainer._guided_noise_pred(unet, latents, t, cond)
    per_row = ((policy - base) ** 2).mean(dim=(1, 2, 3))
    assert (per_row > 0).all()
    torch.testing.assert_close(value, per_row[2:].sum() / 4, rtol=1e-4, atol=1e-7)
    assert trainer._anchor_loss(unet, latents, t, cond, [], 4) == 0


@pytest.mark.parametrize("tags, anchored", [(["safe"], True), (["other"], False)])
def test_the_loss_adds_weight_times_anchor(tiny_sd_path, prompt_file, tmp_path, tags, anchored):
    trainer = perturbed(build(tiny_sd_path, prompt_file, tmp_path, anchor_loss_weight=3.0, anchor_prompts_tags=tags))
    loss = trainer.compute_loss(trainer.model, ROWS)
    reward_part, anchor = trainer._metrics["loss/reward"][-1], trainer._metrics["loss/anchor"][-1]
    assert (anchor > 0) is anchored
    torch.testing.assert_close(loss, torch.tensor(reward_part + 3.0 * anchor), rtol=1e-5, atol=1e-6)


def test_the_anchor_is_zero_at_the_base_model_and_its_gradient_reaches_the_adapter(
    tiny_sd_path, prompt_file, tmp_path
):
    trainer = build(tiny_sd_path, prompt_file, tmp_path, anchor_loss_weight=1.0, reward_scale=0.0)
    assert trainer.compute_loss(trainer.model, ROWS) == 0  # LoRA B starts at zero: the adapter is the base model
    perturbed(trainer)
    trainer.compute_loss(trainer.model, ROWS).backward()
    grads = [p.grad for n, p in trainer.model.named_parameters() if "lora" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
