"""ReFL (ImageReward, Xu et al. 2023): the reward's gradient flows into the LoRA weights through one late denoising
step, plus the pre-training regulariser the public script lacks (the ordinary denoising loss on image–caption pairs).

Each micro-batch: sample x_T; denoise without grad down to a step k drawn from `grad_step_window`; take step k with
grad and read its predicted x0; decode with grad; loss = reward_scale × φ(reward) [+ weight × denoising loss].
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from rl_safety.rewards import RewardStack

from ..pretrain_data import PretrainData
from ..sampling import ddim_step
from .base import MicroBatchTrainer, adapters_disabled
from .refl_config import ReFLConfig


def reward_loss(rewards: torch.Tensor, kind: str, target: float) -> torch.Tensor:
    """φ(reward) per sample: ReLU(target − r) (the paper's code) or −r."""
    return F.relu(target - rewards) if kind == "relu" else -rewards


def denoising_loss(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """The pre-training loss: MSE between the UNet's prediction for the noised latents and the scheduler's target
    for its `prediction_type` (the noise, the velocity, or the clean latents)."""
    t = timesteps
    noisy = scheduler.add_noise(latents, noise, t)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    elif prediction_type == "sample":
        target = latents
    else:
        raise ValueError(f"scheduler prediction_type={prediction_type!r}: expected epsilon, v_prediction or sample")
    pred = unet(noisy.to(cond.dtype), t, encoder_hidden_states=cond).sample.float()
    return F.mse_loss(pred, target.float())


class ReFLTrainer(MicroBatchTrainer):
    """Trains a LoRA adapter on `pipeline.unet` with ReFL. Every reward must be differentiable.

    Args:
        pipeline: a Stable Diffusion pipeline (see `rl_safety.pipelines.load_pipeline`); its UNet receives the adapter.
        args: the configuration.
        train_dataset: a `datasets.Dataset` with `prompt` and `tag` columns.
        reward_stack: the weighted rewards (all differentiable).
        pretrain_data: image–caption pairs for the regulariser (built from `args.pretrain_dataset` when None).
        target_concept: left out of the toy world's regulariser data.
    """

    _tag_names = ["rl_safety", "refl"]

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        args: ReFLConfig,
        train_dataset,
        reward_stack: RewardStack,
        callbacks=None,
        pretrain_data: PretrainData | None = None,
        target_concept: str | None = None,
    ):
        check_differentiable(reward_stack)
        super().__init__(pipeline, args, train_dataset, reward_stack, callbacks=callbacks)
        if pretrain_data is None and args.pretrain_dataset:
            pretrain_data = PretrainData(
                args.pretrain_dataset,
                self.resolution,
                seed=args.seed,
                split=args.pretrain_split,
                image_column=args.pretrain_image_column,
                caption_column=args.pretrain_caption_column,
                exclude_concept=target_concept,
            )
        self.pretrain_data = pretrain_data
        self.grad_steps = torch.tensor(args.grad_steps())

    # ---- losses ---------------------------------------------------------------------------------------------------
    def _reward_loss(self, model: torch.nn.Module, rows: list[dict[str, Any]], generator) -> torch.Tensor:
        args = self.args
        prompts = [row["prompt"] for row in rows]
        tags = [row["tag"] for row in rows]
        batch = len(prompts)
        cond, tags = self._adversarial_condition(prompts, tags, self.prompt_encoder(prompts))
        # The same draws on every process (see _global_randn), including the step that gets the gradient.
        latents = self._global_randn(batch, self.latent_shape, generator) * self.scheduler.init_noise_sigma
        k = int(self.grad_steps[torch.randint(len(self.grad_steps), (1,), generator=generator)])
        anchor_step = int(torch.randint(k + 1, (1,), generator=generator)) if args.anchor_loss_weight else None
        timesteps = self.scheduler.timesteps
        start = time.perf_counter()
        with torch.no_grad():
            for i, t in enumerate(self._progress(timesteps[:k], "sampling")):
                if i == anchor_step:
                    anchor_latents = latents
                noise = self._global_randn(batch, self.latent_shape, generator) if args.eta > 0 else None
                pred = self._guided_noise_pred(model, latents, t, cond)
                latents = ddim_step(self.scheduler, pred, t, latents, args.eta, noise=noise).prev_sample
        if anchor_step == k:
            anchor_latents = latents
        self._metrics["time/sampling"].append(time.perf_counter() - start)
        pred = self._guided_noise_pred(model, latents, timesteps[k], cond)
        x0 = ddim_step(self.scheduler, pred, timesteps[k], latents, args.eta).pred_original_sample
        images = self._decode(x0)
        start = time.perf_counter()
        scores = self.reward_stack(images, prompts, tags=tags, step=self.state.global_step)
        self._metrics["time/reward"].append(time.perf_counter() - start)
        loss = args.reward_scale * reward_loss(scores.total, args.reward_loss, args.reward_target).mean()

        gather = self.accelerator.gather
        m = self._metrics
        for name, values in scores.components.items():
            gathered = gather(values.detach())
            m[f"rewards/{name}/mean"].append(gathered.mean().item())
            m[f"rewards/{name}/std"].append(gathered.std().item() if gathered.numel() > 1 else 0.0)
        total = gather(scores.total.detach())
        m["reward"].append(total.mean().item())
        m["reward_std"].append(total.std().item() if total.numel() > 1 else 0.0)
        m["grad_step"].append(float(k))
        m["loss/reward"].append(gather(loss.detach()).mean().item())
        if anchor_step is not None:
            rows = [i for i, tag in enumerate(tags) if tag in args.anchor_prompts_tags]
            anchor = self._anchor_loss(model, anchor_latents, timesteps[anchor_step], cond, rows, batch)
            loss = loss + args.anchor_loss_weight * anchor
        return loss

    def _anchor_loss(
        self, model: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, rows, batch: int
    ) -> torch.Tensor:
        """Mean squared distance between the adapter's and the base model's guided predictions on `rows`, summed
        over them and divided by the batch (so a row weighs the same whatever the share of anchored rows)."""
        distance = torch.zeros((), device=latents.device)
        if rows:
            index = torch.tensor(rows, device=latents.device)
            pred = self._guided_noise_pred(model, latents[index], t, cond[index])
            with torch.no_grad(), adapters_disabled(self.accelerator.unwrap_model(model)):
                base = self._guided_noise_pred(model, latents[index], t, cond[index])
            distance = (pred - base).pow(2).mean(dim=(1, 2, 3)).sum() / batch
        self._metrics["loss/anchor"].append(self.accelerator.gather(distance.detach()).mean().item())
        return distance

    def _pretrain_loss(self, model: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
        size = self.args.pretrain_batch_size or self.args.per_device_train_batch_size
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        # The global batch of pairs, noise and timesteps, sliced per process: the run does not depend on the split.
        images, captions = self.pretrain_data.batch(size * world, self._micro_step())
        images, captions = images[rank * size : (rank + 1) * size], captions[rank * size : (rank + 1) * size]
        vae = self.pipeline.vae
        with torch.no_grad():
            pixels = images.to(self.accelerator.device, vae.dtype)
            # The posterior's mean: deterministic, so the regulariser's value does not depend on the VAE's noise.
            latents = vae.encode(pixels).latent_dist.mean.float() * vae.config.scaling_factor
        cond = self.prompt_encoder(captions).to(self.pipeline.unet.dtype)
        noise = self._global_randn(size, tuple(latents.shape[1:]), generator)
        steps = torch.randint(self.scheduler.config.num_train_timesteps, (size * world,), generator=generator)
        timesteps = steps[rank * size : (rank + 1) * size].to(latents.device)
        loss = denoising_loss(model, self.scheduler, latents, cond, noise, timesteps)
        self._metrics["loss/pretrain"].append(self.accelerator.gather(loss.detach()).mean().item())
        return loss

    def _phase(self) -> tuple[bool, bool]:
        """(reward loss on, denoising loss on) for the current optimizer step."""
        every = self.args.pretrain_every
        if self.pretrain_data is None:
            return True, False
        if every == 0:
            return True, True
        pretrain_step = (self.state.global_step + 1) % every == 0
        return not pretrain_step, pretrain_step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """reward_scale × φ(reward) and/or pretrain_loss_weight × denoising loss (see `pretrain_every`)."""
        generator = self._micro_step_generator()
        use_reward, use_pretrain = self._phase()
        loss = torch.zeros((), device=self.accelerator.device)
        if use_reward:
            loss = loss + self._reward_loss(model, inputs, generator)
        if use_pretrain:
            loss = loss + self.args.pretrain_loss_weight * self._pretrain_loss(model, generator)
        return loss


def check_differentiable(reward_stack: RewardStack) -> None:
    """A one-line ValueError naming the rewards whose gradient cannot reach the image, and listing those that can."""
    not_differentiable = [reward_stack.labels[n] for n in reward_stack.names if not reward_stack.is_differentiable(n)]
    if not_differentiable:
        raise ValueError(
            f"rewards: {', '.join(not_differentiable)} not differentiable, and ReFL needs the reward's gradient; "
            f"differentiable rewards: {', '.join(differentiable_rewards())}"
        )


def differentiable_rewards() -> Sequence[str]:
    """Built-in rewards whose gradient reaches the image (what ReFL accepts)."""
    from rl_safety.rewards.base import BUILTIN_REWARDS, resolve_reward

    return [name for name in sorted(BUILTIN_REWARDS) if getattr(resolve_reward(name), "differentiable", False)]
