"""Time one GRPO iteration (sampling, reward, update) against the bare UNet calls it is made of, in the same run.

    python benchmarks/grpo_step.py                      # tiny pipeline (and SD1.5-size on a GPU, when present)
    python benchmarks/grpo_step.py --model sd15-random  # full-size SD1.5 architecture, random weights
    python benchmarks/grpo_step.py --json results.json

`overhead_ratio` = median iteration time / median time of the same UNet calls alone (the rollout's no-grad forwards
and the update's forward+backward passes, same batch shapes). 1.0 would mean the trainer adds nothing around the UNet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, TrainerCallback

from rl_safety.model_config import ModelArguments
from rl_safety.pipelines import load_pipeline
from rl_safety.prompts import Dataset
from rl_safety.rewards import RewardStack
from rl_safety.tiny_pipeline import (
    assemble_pipeline,
    build_tiny_pipeline,
    build_tiny_tokenizer,
    text_encoder_config,
)
from rl_safety.trainers import DiffusionGRPOConfig, DiffusionGRPOTrainer


def sd15_random_pipeline() -> StableDiffusionPipeline:
    """SD1.5's UNet/VAE/text-encoder architecture with random weights (no download), tiny char-level tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer, width=768, layers=12, heads=12))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD1.5 defaults
    return assemble_pipeline(tokenizer, text_encoder, vae, unet)


class InterleavedTimer(TrainerCallback):
    """Times each optimizer step and, right after it, the same UNet calls alone: A/B pairs measured back to back,
    so a machine whose speed drifts affects both sides of each ratio alike."""

    def __init__(self, batch: int):
        self.batch, self.trainer = batch, None
        self.steps, self.bare, self._start = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = _now(self.trainer.accelerator.device)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(_now(self.trainer.accelerator.device) - self._start)
        self.bare.append(bare_unet_time(self.trainer, self.batch))


def bare_unet_time(trainer: DiffusionGRPOTrainer, batch: int) -> tuple[float, float]:
    """Seconds of one iteration's UNet calls alone, as (sampling, update): num_inference_steps no-grad forwards and
    num_train_timesteps forward+backward passes, CFG-doubled batch, random inputs."""
    unet, args = trainer.model, trainer.args
    device = trainer.accelerator.device
    cfg = 2 if args.guidance_scale != 1.0 else 1
    x = torch.randn(batch * cfg, *trainer.latent_shape, device=device)
    t = torch.full((batch * cfg,), 500, device=device)
    emb = trainer.prompt_encoder(["a photo"] * batch * cfg)
    start = _now(device)
    with torch.no_grad(), trainer.compute_loss_context_manager():
        for _ in range(args.num_inference_steps):
            unet(x, t, encoder_hidden_states=emb)
    middle = _now(device)
    for _ in range(trainer.num_train_timesteps):
        with trainer.compute_loss_context_manager():
            out = unet(x, t, encoder_hidden_states=emb).sample.float().mean()
        out.backward()
    end = _now(device)
    unet.zero_grad(set_to_none=True)  # the next training step must start from clean gradients
    return middle - start, end - middle


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def run(model: str, args: argparse.Namespace) -> dict:
    """Train `args.iterations + 1` GRPO steps on `model`, timing each against its bare UNet calls."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        pipe_dir = Path(tmp) / "model"
        (build_tiny_pipeline() if model == "tiny" else sd15_random_pipeline()).save_pretrained(pipe_dir)
        dtype = "auto" if model == "tiny" else "bfloat16"
        pipeline = load_pipeline(ModelArguments(str(pipe_dir), torch_dtype=dtype))
        config = DiffusionGRPOConfig(
            output_dir=str(Path(tmp) / "out"),
            per_device_train_batch_size=args.batch,
            num_generations=args.num_generations,
            num_inference_steps=args.steps,
            max_steps=args.iterations + 1,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            bf16=model != "tiny",
            disable_tqdm=True,
            rewards=[{"name": "jpeg_incompressibility"}],
        )
        prompts = Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(16)], "tag": ["safe"] * 16})
        timer = InterleavedTimer(args.batch)
        trainer = DiffusionGRPOTrainer(
            pipeline, config, prompts, RewardStack.from_config(config.rewards), callbacks=[timer]
        )
        timer.trainer = trainer
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "time/sampling" in entry][1:]

    steps, bare = timer.steps[1:], timer.bare[1:]  # the first step is the warm-up
    result = {
        "model": model,
        "device": str(trainer.accelerator.device),
        "images_per_iteration": args.batch,
        "num_inference_steps": args.steps,
        "num_train_timesteps": trainer.num_train_timesteps,
        "iteration_s": statistics.median(steps),
        "sampling_s": statistics.median(entry["time/sampling"] for entry in logs),
        "reward_s": statistics.median(entry["time/reward"] for entry in logs),
        "update_s": statistics.median(entry["time/update"] for entry in logs),
        "bare_sampling_s": statistics.median(s for s, _ in bare),
        "bare_update_s": statistics.median(u for _, u in bare),
        "bare_unet_s": statistics.median(s + u for s, u in bare),
        # Median of the per-step ratios: each pair was measured back to back.
        "overhead_ratio": statistics.median(step / (s + u) for step, (s, u) in zip(steps, bare)),
    }
    result["other_s"] = result["iteration_s"] - result["sampling_s"] - result["reward_s"] - result["update_s"]
    return result


def report(result: dict) -> None:
    iteration = result["iteration_s"]
    print(
        f"GRPO iteration on {result['model']} ({result['device']}), {result['images_per_iteration']} images, "
        f"{result['num_inference_steps']} steps"
    )
    print(f"{'part':<14}{'seconds':>10}{'share':>8}")
    for part in ("sampling", "reward", "update", "other"):
        print(f"{part:<14}{result[part + '_s']:>10.4f}{result[part + '_s'] / iteration:>8.1%}")
    print(f"{'iteration':<14}{iteration:>10.4f}")
    print(
        f"{'bare UNet':<14}{result['bare_unet_s']:>10.4f}  "
        f"(sampling {result['bare_sampling_s']:.4f}, update {result['bare_update_s']:.4f})"
    )
    print(f"overhead_ratio {result['overhead_ratio']:.3f}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=["tiny", "sd15-random", "all"],
        default="all" if torch.cuda.is_available() else "tiny",
        help="tiny pipeline, full-size SD1.5 architecture with random weights, or both (default with a GPU)",
    )
    parser.add_argument("--batch", type=int, default=8, help="images per iteration (per device)")
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="num_inference_steps")
    parser.add_argument("--iterations", type=int, default=6, help="timed iterations (after one warm-up)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    models = ["tiny", "sd15-random"] if args.model == "all" else [args.model]
    results = []
    for model in models:
        results.append(run(model, args))
        report(results[-1])
    if args.json:
        args.json.write_text(json.dumps(results if len(results) > 1 else results[0], indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
