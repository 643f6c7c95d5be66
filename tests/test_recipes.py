"""Every shipped training recipe parses with its trainer, and its rewards resolve with arguments the reward accepts
(the GPU recipes cannot run here, but a typo in them fails this test)."""

import inspect
from pathlib import Path

import pytest

from rl_safety.rewards import resolve_reward
from rl_safety.train import parse_args
from rl_safety.trainers import TRAINERS

from .conftest import REPO

# Training recipes only: accelerate configs, evaluation, attack and classifier (DyART) recipes have their own tests.
TRAINING_RECIPES = sorted(
    p
    for p in (REPO / "recipes").rglob("*.yaml")
    if p.parent.name not in ("accelerate", "dyart", "eval") and not p.name.startswith(("eval", "attack"))
)


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_parses_and_its_rewards_bind(recipe: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    model_args, prompt_args, args = parse_args(["--config", str(recipe)])
    assert isinstance(args, TRAINERS[args.trainer][0])
    assert model_args.pretrained_model_name_or_path and prompt_args.train_prompts
    assert args.rewards or not args.needs_rewards  # ESD trains without rewards
    for entry in args.rewards:
        factory = resolve_reward(entry["name"])
        inspect.signature(factory).bind(**entry.get("args", {}))  # raises TypeError on an unknown argument


def test_sd14_recipes_hold_the_papers_settings():
    _, _, refl = parse_args(["--config", str(REPO / "recipes/sd14/refl_imagereward.yaml")])
    assert (refl.num_inference_steps, refl.grad_steps(), refl.reward_scale) == (40, list(range(30, 40)), 1e-3)
    assert refl.pretrain_dataset and refl.reward_loss == "relu" and refl.reward_target == 2.0
    _, prompts, grpo = parse_args(["--config", str(REPO / "recipes/sd14/grpo_safediffusion_r1.yaml")])
    assert (grpo.num_inference_steps, grpo.eta, grpo.guidance_scale, grpo.num_generations) == (50, 1.0, 5.0, 16)
    assert grpo.same_initial_noise_per_group and grpo.adv_clip_max == 2.5
    steering = grpo.rewards[0]["args"]
    assert steering["model"] == "ViT-H-14" and "HPS_v2.1" in steering["checkpoint"] and steering["alpha"] == 0.5
    assert prompts.train_prompts == ["ItsMaxNorm/SafeDiffusion-R1-dataset"]
