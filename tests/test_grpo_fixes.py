"""GRPO fixes from review: TRL's rule for when old log-probs may be taken as current, distinct noise for rollouts
within one optimizer step, exact resume inside a reused rollout, half-precision weights without autocast, and a
start-up error that names the real cause of a noiseless step."""

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from rl_safety.model_config import ModelArguments
from rl_safety.pipelines import load_pipeline
from rl_safety.prompt_config import PromptArguments
from rl_safety.prompts import load_prompts
from rl_safety.rewards import RewardStack
from rl_safety.train import main
from rl_safety.trainers import DiffusionGRPOConfig, DiffusionGRPOTrainer
from rl_safety.trainers.grpo import noiseless_step_error
from tests.conftest import recipe_args


def build(tiny_sd_path, prompt_file, tmp_path, **overrides):
    fields = dict(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        rewards=[{"name": "jpeg_incompressibility"}],
        num_generations=2,
        per_device_train_batch_size=2,
        num_inference_steps=3,
        seed=0,
    )
    fields.update(overrides)
    args = DiffusionGRPOConfig(**fields)
    pipe = load_pipeline(ModelArguments(pretrained_model_name_or_path=str(tiny_sd_path)))
    dataset = load_prompts(PromptArguments(train_prompts=[str(prompt_file)]))
    return DiffusionGRPOTrainer(pipe, args, dataset, RewardStack.from_config(args.rewards))


@pytest.mark.parametrize(
    "accumulation, steps_per_generation, iterations, fixed",
    [(3, 2, 1, False), (4, 2, 1, True), (1, 1, 1, True), (2, 1, 2, True), (1, 1, 2, False), (2, 2, 2, False)],
)
def test_policy_fixed_follows_trls_rule(
    tiny_sd_path, prompt_file, tmp_path, accumulation, steps_per_generation, iterations, fixed
):
    trainer = build(
        tiny_sd_path,
        prompt_file,
        tmp_path,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=steps_per_generation,
        num_iterations=iterations,
    )
    assert trainer.policy_fixed_per_rollout is fixed


def test_a_rollout_spanning_an_optimizer_step_is_clipped(tiny_sd_path, prompt_file, tmp_path):
    """Accumulation 3, two micro-batches per rollout: the second rollout's last micro-batch comes after an optimizer
    step, so its ratio is not 1 and clipping acts (the old rule forced the ratio to 1 there)."""
    out = tmp_path / "span"
    prompts = tmp_path / "six.txt"  # enough prompts for two full accumulation windows in one epoch
    prompts.write_text("# tag: safe\n" + "".join(f"a {c} {s}\n" for c in ("red", "blue", "green") for s in "AB"))
    argv = recipe_args(
        tiny_sd_path,
        prompts,
        out,
        gradient_accumulation_steps=3,
        steps_per_generation=2,
        per_device_train_batch_size=2,
        max_steps=2,
        epsilon=1e-6,
        learning_rate=0.05,
    )
    assert main(argv) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "clip_ratio" in line]
    assert "logprob_rollout_gap" not in logs[0]
    assert logs[0]["clip_ratio"] == 0  # step 1: no rollout was drawn before an update
    assert logs[1]["clip_ratio"] > 0


def test_rollouts_within_one_optimizer_step_draw_different_noise(tiny_sd_path, prompt_file, tmp_path):
    trainer = build(
        tiny_sd_path, prompt_file, tmp_path, gradient_accumulation_steps=2, steps_per_generation=1, max_steps=1
    )
    starts = []
    original = trainer._initial_noise

    def record(batch, generator):
        noise = original(batch, generator)
        starts.append(noise)
        return noise

    trainer._initial_noise = record
    trainer.train()
    assert len(starts) == 2 and not torch.equal(starts[0], starts[1])


def test_resume_inside_a_reused_rollout_is_exact(tiny_sd_path, prompt_file, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = dict(num_iterations=2, max_steps=3, save_steps=1, learning_rate=0.05)
    main(recipe_args(tiny_sd_path, prompt_file, straight, **common))
    main(recipe_args(tiny_sd_path, prompt_file, resumed, **common))
    # Interrupted after step 1, in the middle of the first rollout's two passes.
    for name in ("checkpoint-2", "checkpoint-3"):
        shutil.rmtree(resumed / name)
    assert (resumed / "checkpoint-1" / "rollout_buffer-rank0.safetensors").is_file()
    main(recipe_args(tiny_sd_path, prompt_file, resumed, resume_from_checkpoint="last", **common))
    a, b = (
        load_file(straight / "pytorch_lora_weights.safetensors"),
        load_file(resumed / "pytorch_lora_weights.safetensors"),
    )
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_bfloat16_weights_train_without_autocast(tiny_sd_path, prompt_file, tmp_path):
    out = tmp_path / "bf16"
    assert main(recipe_args(tiny_sd_path, prompt_file, out, torch_dtype="bfloat16", max_steps=2)) == 0
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora.up" in k or "lora_B" in k)


def test_noiseless_step_error_names_the_real_cause():
    linspace = DDIMScheduler(timestep_spacing="linspace", steps_offset=0, set_alpha_to_one=False)
    linspace.set_timesteps(5)
    message = noiseless_step_error(linspace, 1.0)
    assert "timestep_spacing='linspace'" in message and "set_alpha_to_one" not in message
    alpha_one = DDIMScheduler(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True)
    alpha_one.set_timesteps(5)
    assert "set_alpha_to_one=True" in noiseless_step_error(alpha_one, 1.0)
    fine = DDIMScheduler(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    fine.set_timesteps(5)
    assert noiseless_step_error(fine, 1.0) is None
