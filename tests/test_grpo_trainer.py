import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rl_safety.train import main
from tests.conftest import REPO, recipe_args


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_outputs_and_trl_metrics(tiny_sd_path, prompt_file, tmp_path):
    out = tmp_path / "run"
    assert main(recipe_args(tiny_sd_path, prompt_file, out, beta=0.04)) == 0
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") and "lora" in k for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)  # it trained

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["num_generations"] == 2 and config["runtime"]["world_size"] == 1
    card = (out / "README.md").read_text()
    assert str(tiny_sd_path) in card and "jpeg_incompressibility" in card and "reward" in card

    logs = read_metrics(out)
    step_logs = [r for r in logs if "reward" in r]
    assert [r["step"] for r in step_logs] == [1, 2]
    for key in (
        "reward",
        "reward_std",
        "rewards/jpeg_incompressibility/mean",
        "rewards/jpeg_incompressibility/std",
        "frac_reward_zero_std",
        "kl",
        "clip_ratio",
        "images_per_second",
        "sampling/images_per_second",
        "time/sampling",
        "time/update",
    ):
        assert key in step_logs[0], key
    # The whole iteration's rate is below the sampler's alone: sampling is only part of a step's time.
    for r in step_logs:
        assert 0 < r["images_per_second"] < r["sampling/images_per_second"]
        images = 4  # per_device_train_batch_size, one rollout per step
        assert r["images_per_second"] == pytest.approx(images / r["time/step"])
    # The adapter starts as a no-op, so the first step's policy is the base model: KL exactly 0, ratio exactly 1.
    assert step_logs[0]["kl"] == 0.0
    assert step_logs[0]["clip_ratio"] == 0.0
    assert step_logs[1]["kl"] > 0.0
    # Re-scoring the rollout's transitions under the unchanged policy reproduces the sampler's log-probs.
    assert all(r["logprob_rollout_gap"] < 1e-5 for r in step_logs)


def test_rollout_reuse_uses_stored_log_probs(tiny_sd_path, prompt_file, tmp_path):
    """With num_iterations=2 the second pass uses the rollout's log-probs, and the moved policy gets clipped."""
    out = tmp_path / "reuse"
    main(recipe_args(tiny_sd_path, prompt_file, out, num_iterations=2, epsilon=1e-6, max_steps=2, learning_rate=0.05))
    step_logs = [r for r in read_metrics(out) if "clip_ratio" in r]
    assert "logprob_rollout_gap" not in step_logs[0]
    assert step_logs[0]["clip_ratio"] == 0.0  # first pass: same parameters as the rollout
    assert step_logs[1]["clip_ratio"] > 0.0  # second pass on the same rollout, after one optimizer step


def test_resume_reproduces_uninterrupted_run(tiny_sd_path, prompt_file, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(recipe_args(tiny_sd_path, prompt_file, straight, max_steps=4, save_steps=2))
    main(recipe_args(tiny_sd_path, prompt_file, resumed, max_steps=4, save_steps=2))
    # Simulate an interruption after step 2: drop everything written later.
    import shutil

    shutil.rmtree(resumed / "checkpoint-4")
    (resumed / "pytorch_lora_weights.safetensors").unlink()
    main(recipe_args(tiny_sd_path, prompt_file, resumed, max_steps=4, save_steps=2, resume_from_checkpoint="last"))
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    steps = [r["step"] for r in read_metrics(resumed) if "reward" in r]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_jpeg_incompressibility_increases(tiny_sd_path, prompt_file, tmp_path):
    """20 GRPO iterations of the smoke recipe raise the JPEG size over the same seed's untrained policy.

    Both runs draw identical noise (same seed), so iteration k of each differs only by the policy."""
    recipe = yaml.safe_load((REPO / "recipes/tiny/grpo_jpeg.yaml").read_text())
    fields = {k: recipe[k] for k in JPEG_FIELDS}
    trained = tmp_path / "trained"
    main(recipe_args(tiny_sd_path, prompt_file, trained, **fields))
    untrained = tmp_path / "untrained"
    main(recipe_args(tiny_sd_path, prompt_file, untrained, **{**fields, "learning_rate": 1e-12}))
    after = [r["reward"] for r in read_metrics(trained) if "reward" in r]
    before = [r["reward"] for r in read_metrics(untrained) if "reward" in r]
    assert len(after) == len(before) == 20
    assert after[0] == pytest.approx(before[0])  # same seed, same first rollout
    gains = [a - b for a, b in zip(after[10:], before[10:])]
    assert sum(gains) / len(gains) > 0.001  # kB per image, averaged over the last 10 iterations
    assert sum(g > 0 for g in gains) >= 8


JPEG_FIELDS = (
    "rewards",
    "num_generations",
    "per_device_train_batch_size",
    "max_steps",
    "learning_rate",
    "lora_rank",
    "lora_target_modules",
    "num_inference_steps",
    "eta",
    "guidance_scale",
    "epsilon",
    "adv_clip_max",
)
