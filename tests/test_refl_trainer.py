"""ReFL: gradients reach only the adapter, the regulariser enters the loss as stated, non-differentiable rewards
are refused by name, resume and two processes reproduce one uninterrupted process, and erasure works."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image
from safetensors.torch import load_file

from rl_safety.pipelines import load_pipeline
from rl_safety.pretrain_data import PretrainData
from rl_safety.prompts import load_prompts
from rl_safety.rewards import RewardStack
from rl_safety.train import cli, main, parse_args
from rl_safety.trainers import ReFLConfig, ReFLTrainer
from rl_safety.trainers.refl import denoising_loss, reward_loss
from tests.conftest import REPO, recipe_args

# A differentiable reward that needs no model: brightness of the image.
BRIGHT = {"name": "tests.test_refl_trainer:brightness"}


def brightness(images, prompts, **context):
    return images.mean(dim=(1, 2, 3))


brightness.differentiable = True


def refl_args(model, prompts, out, **overrides):
    """The shared small-run arguments with ReFL's fields (conftest's GRPO-only num_generations dropped)."""
    fields = dict(
        trainer="refl",
        rewards=[BRIGHT],
        num_inference_steps=4,
        reward_loss="linear",
        reward_scale=1.0,
        per_device_train_batch_size=4,
    )
    fields.update(overrides)
    argv = recipe_args(model, prompts, out, **fields)
    i = argv.index("--num_generations")
    return argv[:i] + argv[i + 2 :]


def build(tiny_sd_path, prompt_file, tmp_path, **overrides):
    from rl_safety.model_config import ModelArguments
    from rl_safety.prompt_config import PromptArguments

    fields = dict(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        rewards=[BRIGHT],
        num_inference_steps=4,
        reward_loss="linear",
        reward_scale=1.0,
        per_device_train_batch_size=4,
        seed=0,
        learning_rate=1e-2,
    )
    fields.update(overrides)
    args = ReFLConfig(**fields)
    pipe = load_pipeline(ModelArguments(pretrained_model_name_or_path=str(tiny_sd_path)))
    dataset = load_prompts(PromptArguments(train_prompts=[str(prompt_file)]))
    return ReFLTrainer(pipe, args, dataset, RewardStack.from_config(args.rewards))


def test_gradients_reach_only_the_adapter(tiny_sd_path, prompt_file, tmp_path):
    trainer = build(tiny_sd_path, prompt_file, tmp_path)
    model = trainer.model
    # Perturb the B matrices so the adapter is not a no-op and every LoRA weight gets a gradient.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    rows = [{"prompt": "a red circle", "tag": "safe"}] * 4
    loss = trainer.compute_loss(model, rows)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())
    for module in (trainer.pipeline.vae, trainer.pipeline.text_encoder):
        assert all(p.grad is None for p in module.parameters())


def test_reward_loss_is_relu_or_negated_reward():
    r = torch.tensor([0.5, 2.5, -1.0])
    torch.testing.assert_close(reward_loss(r, "relu", 2.0), torch.tensor([1.5, 0.0, 3.0]))
    torch.testing.assert_close(reward_loss(r, "linear", 2.0), -r)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoising_loss_targets_the_schedulers_prediction(prediction_type):
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    cond = torch.zeros(3, 2, 8)
    # A "UNet" that returns a fixed prediction: the loss is its MSE against the target, computed by hand here.
    pred = torch.randn(3, 4, 8, 8)

    class Fixed(torch.nn.Module):
        def forward(self, x, timesteps, encoder_hidden_states):
            return type("Out", (), {"sample": pred})

    a = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * latents, "sample": latents}
    expected = ((pred - target[prediction_type]) ** 2).mean()
    torch.testing.assert_close(denoising_loss(Fixed(), scheduler, latents, cond, noise, t), expected)


def test_mixed_regulariser_adds_weight_times_denoising_loss(tiny_sd_path, prompt_file, tmp_path):
    rows = [{"prompt": "a red circle", "tag": "safe"}] * 4
    with_reg = build(tiny_sd_path, prompt_file, tmp_path, pretrain_dataset="toyworld", pretrain_loss_weight=3.0)
    without = build(tiny_sd_path, prompt_file, tmp_path)
    only_reg = build(
        tiny_sd_path, prompt_file, tmp_path, pretrain_dataset="toyworld", pretrain_loss_weight=3.0, reward_scale=0.0
    )
    total = with_reg.compute_loss(with_reg.model, rows)
    reward_part = without.compute_loss(without.model, rows)
    pretrain_part = with_reg._metrics["loss/pretrain"][0]
    assert pretrain_part > 0
    torch.testing.assert_close(total, reward_part + 3.0 * pretrain_part, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(only_reg.compute_loss(only_reg.model, rows), torch.tensor(3.0 * pretrain_part))


def test_alternating_regulariser_takes_every_nth_step(tiny_sd_path, prompt_file, tmp_path):
    out = tmp_path / "alt"
    argv = refl_args(tiny_sd_path, prompt_file, out, pretrain_dataset="toyworld", pretrain_every=3, max_steps=6)
    assert main(argv) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss/' in line]
    kinds = ["pretrain" if "loss/pretrain" in r else "reward" for r in logs]
    assert all(("loss/pretrain" in r) != ("loss/reward" in r) for r in logs)  # never both in one step
    assert kinds == ["reward", "reward", "pretrain", "reward", "reward", "pretrain"]


def test_pretrain_data_from_a_folder_a_file_and_the_toy_world(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (20, 12), colour).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"image {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    images, captions = PretrainData(str(folder), resolution=8).batch(6, index=0)
    assert images.shape == (6, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    red = [c == "image 0" for c in captions]
    assert all((img[0] > 0.9).all() == is_red for img, is_red in zip(images, red))  # captions stay with images

    table = tmp_path / "pairs.jsonl"
    table.write_text(
        "".join(json.dumps({"path": f"pairs/{r['file_name']}", "text": r["caption"]}) + "\n" for r in rows)
    )
    data = PretrainData(str(table), resolution=8, image_column="path", caption_column="text")
    again, captions_again = data.batch(6, index=0)
    assert captions_again == captions and torch.equal(again, images)  # same seed and index: same pairs
    with pytest.raises(ValueError, match="pretrain_caption_column='caption'"):
        PretrainData(str(table), resolution=8, image_column="path")

    toy_images, toy_captions = PretrainData("toyworld", resolution=32, exclude_concept="red").batch(64, index=3)
    assert toy_images.shape == (64, 3, 32, 32)
    assert not any("red" in c or "crimson" in c or "scarlet" in c for c in toy_captions)
    _, shape_captions = PretrainData("toyworld", resolution=32, exclude_concept="circle").batch(64, index=3)
    assert not any("circle" in c for c in shape_captions)


def test_non_differentiable_rewards_are_refused_by_name(tiny_sd_path, prompt_file, tmp_path, capsys):
    argv = refl_args(tiny_sd_path, prompt_file, tmp_path / "x", rewards=[{"name": "jpeg_incompressibility"}])
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "jpeg_incompressibility not differentiable" in err
    assert "clip_steering" in err and "toyworld_concept" in err  # lists what would work


def test_fields_of_another_trainer_are_refused(tiny_sd_path, prompt_file, tmp_path, capsys):
    argv = refl_args(tiny_sd_path, prompt_file, tmp_path / "x") + ["--num_generations", "4"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "'num_generations': not a field of trainer refl (it belongs to trainer grpo)" in err, err
    argv = recipe_args(tiny_sd_path, prompt_file, tmp_path / "y", reward_target=1.0)
    assert cli(argv) == 2
    assert "not a field of trainer grpo (it belongs to trainer refl)" in capsys.readouterr().err
    assert cli(refl_args(tiny_sd_path, prompt_file, tmp_path / "z", trainer="dpo")) == 2
    assert "trainer='dpo': valid trainers are grpo, refl" in capsys.readouterr().err


def test_recipes_parse_with_their_trainer():
    recipe = str(REPO / "recipes/toyworld/refl_erase_red.yaml")
    _, prompt_args, args = parse_args(["--config", recipe, "--target_concept", "square"])
    assert isinstance(args, ReFLConfig) and args.output_dir.endswith("square")
    assert prompt_args.train_prompts[0] == "prompts/toyworld/square/unsafe.txt"


def test_resume_reproduces_uninterrupted_run(tiny_sd_path, prompt_file, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = dict(max_steps=4, save_steps=2, pretrain_dataset="toyworld", gradient_accumulation_steps=2)
    main(refl_args(tiny_sd_path, prompt_file, straight, **common))
    main(refl_args(tiny_sd_path, prompt_file, resumed, **common))
    shutil.rmtree(resumed / "checkpoint-4")
    (resumed / "pytorch_lora_weights.safetensors").unlink()
    main(refl_args(tiny_sd_path, prompt_file, resumed, resume_from_checkpoint="last", **common))
    a, b = (
        load_file(straight / "pytorch_lora_weights.safetensors"),
        load_file(resumed / "pytorch_lora_weights.safetensors"),
    )
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora.up" in k or "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.slow
def test_two_process_cpu_run_matches_one_process(tiny_sd_path, prompt_file, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", "29541", "-m", "rl_safety.train"]
    common = dict(max_steps=2, pretrain_dataset="toyworld", pretrain_batch_size=2)
    argv = refl_args(tiny_sd_path, prompt_file, two, per_device_train_batch_size=2, **common)
    proc = subprocess.run([*launch, *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    main(
        refl_args(
            tiny_sd_path, prompt_file, one, per_device_train_batch_size=4, **{**common, "pretrain_batch_size": 4}
        )
    )
    a, b = load_file(one / "pytorch_lora_weights.safetensors"), load_file(two / "pytorch_lora_weights.safetensors")
    for key in a:
        assert (a[key] - b[key]).norm() <= 1e-3 * a[key].norm(), key
