"""What every rl_safety trainer shares: a LoRA adapter on the pipeline's UNet, the frozen components on the device,
cached prompt embeddings, guided UNet calls, decoding, seeded global noise, logging and adapter checkpoints.

Each method (`grpo.py`, `refl.py`) subclasses `DiffusionTrainer` and writes its own `training_step`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers import Trainer
from trl.trainer.utils import RepeatSampler

from rl_safety.rewards import RewardStack

from ..pipelines import PromptEncoder, add_lora, load_lora_into, save_lora
from .base_config import DiffusionTrainingConfig


def _collate(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return features


class DiffusionTrainer(Trainer):
    """`transformers.Trainer` over a Stable Diffusion pipeline whose UNet carries the only trainable weights: a LoRA
    adapter. Only the adapter is saved (diffusers format, read by `load_lora_weights`).

    Args:
        pipeline: a Stable Diffusion pipeline (see `rl_safety.pipelines.load_pipeline`); its UNet receives the adapter.
        args: the configuration.
        train_dataset: a `datasets.Dataset` with `prompt` and `tag` columns.
        reward_stack: the weighted rewards (None for a method that uses none, such as ESD).
    """

    _tag_names = ["rl_safety"]

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        args: DiffusionTrainingConfig,
        train_dataset,
        reward_stack: RewardStack | None,
        callbacks=None,
    ):
        unet = pipeline.unet
        if not getattr(unet, "peft_config", None):
            add_lora(unet, args.lora_rank, args.lora_alpha, args.lora_targets(), seed=args.seed)
        if args.gradient_checkpointing or args.activation_checkpointing:
            # A diffusers UNet checkpoints its own blocks; Trainer's hook targets transformers models.
            unet.enable_gradient_checkpointing()
            args.gradient_checkpointing = args.activation_checkpointing = False
        super().__init__(
            model=unet, args=args, train_dataset=train_dataset, data_collator=_collate, callbacks=callbacks
        )
        device = self.accelerator.device
        self.pipeline = pipeline
        pipeline.vae.to(device)
        pipeline.text_encoder.to(device)
        self.reward_stack = reward_stack.to(device) if reward_stack is not None else None
        self.prompt_encoder = PromptEncoder(pipeline.tokenizer, pipeline.text_encoder)
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        self.scheduler.set_timesteps(args.num_inference_steps, device=device)
        self.vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        self.resolution = args.resolution or unet.config.sample_size * self.vae_scale
        side = self.resolution // self.vae_scale
        self.latent_shape = (unet.config.in_channels, side, side)
        self._last_logged_step = 0
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.model_accepts_loss_kwargs = False

    # ---- data -------------------------------------------------------------------------------------------------------
    def _prompt_sampler(self, mini_repeat_count: int, batch_size: int, repeat_count: int) -> RepeatSampler:
        # Same seed on every process: every process sees the global batch and keeps its own slice.
        return EpochSeededRepeatSampler(
            data_source=self.train_dataset,
            mini_repeat_count=mini_repeat_count,
            batch_size=batch_size,
            repeat_count=repeat_count,
            shuffle=True,
            seed=self.args.seed,
        )

    # ---- model calls ------------------------------------------------------------------------------------------------
    def _guided_noise_pred(
        self,
        model: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: torch.Tensor,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """UNet prediction (float32) with classifier-free guidance (`guidance_scale`, default the config's), both
        branches in one batched call.

        Inputs are cast to the UNet's dtype, so half-precision weights work without mixed-precision autocast."""
        dtype = self.pipeline.unet.dtype
        scale = self.args.guidance_scale if guidance_scale is None else guidance_scale
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        if scale == 1.0:
            return model(latents.to(dtype), timesteps, encoder_hidden_states=cond.to(dtype)).sample.float()
        uncond = self.prompt_encoder([self.args.negative_prompt]).expand_as(cond)
        pred = model(
            torch.cat([latents, latents]).to(dtype),
            torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([uncond, cond]).to(dtype),
        ).sample.float()
        pred_uncond, pred_cond = pred.chunk(2)
        return pred_uncond + scale * (pred_cond - pred_uncond)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1] (differentiable when called with grad enabled)."""
        vae = self.pipeline.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _global_randn(self, batch: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """This process's rows of a normal draw made for the whole global batch: every process consumes the same
        random stream, so the samples do not depend on how the batch is split across processes."""
        rank = self.accelerator.process_index
        noise = torch.randn((batch * self.accelerator.num_processes, *shape), generator=generator)
        return noise[rank * batch : (rank + 1) * batch].to(self.accelerator.device)

    # ---- logging and saving -----------------------------------------------------------------------------------------
    # Keys averaged per optimizer step rather than per event: seconds that the logging window spent, over its steps.
    _per_step_keys: tuple[str, ...] = ("time/sampling", "time/reward", "time/update", "time/step")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        metrics = {key: sum(values) / len(values) for key, values in self._metrics.items() if values}
        steps = max(1, self.state.global_step - self._last_logged_step)
        for key in self._per_step_keys:
            if self._metrics.get(key):
                metrics[key] = sum(self._metrics[key]) / steps
        self._last_logged_step = self.state.global_step
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics.clear()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        save_lora(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_lora_into(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def create_model_card(self, *args, **kwargs) -> None:
        """The card is written by the train script, which knows the recipe and rewards (see `outputs.py`)."""


class EpochSeededSampler(torch.utils.data.Sampler):
    """Shuffled indices, reshuffled per epoch from (seed, epoch) alone, repeated to fill whole global batches even
    when the prompt set is smaller than one batch."""

    def __init__(self, size: int, global_batch: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0
        self.num_samples = -(-max(size, global_batch) // global_batch) * global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        rounds = -(-self.num_samples // self.size)
        order = torch.cat([torch.randperm(self.size, generator=generator) for _ in range(rounds)])
        return iter(order[: self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler with a shuffle that depends only on (seed, epoch): the Trainer calls `set_epoch`, so a
    resumed run replays exactly the prompts an uninterrupted one would have seen."""

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


@contextlib.contextmanager
def adapters_disabled(unet: torch.nn.Module):
    """The base model = the UNet with its LoRA adapter switched off (no second UNet in memory)."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
