"""GRPO for text-to-image diffusion: group-relative advantages over images sampled per prompt, a clipped objective
on the per-step log-probs of a stochastic DDIM sampler, and an optional KL to the base model (adapter disabled).

The trainer follows TRL's `GRPOTrainer` layout: the dataloader yields a whole rollout's prompts (each repeated
`num_generations` times, groups possibly spanning processes), `_prepare_inputs` samples and scores them once every
`steps_per_generation × num_iterations` micro-steps and buffers the slices, and `training_step` computes the loss.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import DistributedType
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tqdm.auto import tqdm
from transformers import Trainer
from trl.trainer.utils import RepeatSampler

from rl_safety.rewards import RewardStack

from .advantages import group_advantages
from .grpo_config import DiffusionGRPOConfig
from .pipelines import PromptEncoder, add_lora, load_lora_into, save_lora
from .sampling import ddim_std, ddim_step_with_logprob, gaussian_kl


def _collate(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return features


class DiffusionGRPOTrainer(Trainer):
    """Trains a LoRA adapter on `pipeline.unet` with GRPO. Only the adapter is trained and saved.

    Args:
        pipeline: a Stable Diffusion pipeline (see `rl_safety.pipelines.load_pipeline`); its UNet receives the adapter.
        args: the configuration.
        train_dataset: a `datasets.Dataset` with `prompt` and `tag` columns.
        reward_stack: the weighted rewards.
    """

    _tag_names = ["rl_safety", "grpo"]

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        args: DiffusionGRPOConfig,
        train_dataset,
        reward_stack: RewardStack,
        callbacks=None,
    ):
        unet = pipeline.unet
        if not getattr(unet, "peft_config", None):
            add_lora(unet, args.lora_rank, args.lora_alpha, args.lora_target_modules, seed=args.seed)
        super().__init__(
            model=unet, args=args, train_dataset=train_dataset, data_collator=_collate, callbacks=callbacks
        )
        device = self.accelerator.device
        self.pipeline = pipeline
        pipeline.vae.to(device)
        pipeline.text_encoder.to(device)
        self.reward_stack = reward_stack.to(device)
        self.prompt_encoder = PromptEncoder(pipeline.tokenizer, pipeline.text_encoder)
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        self.scheduler.set_timesteps(args.num_inference_steps, device=device)
        sigmas = ddim_std(self.scheduler, self.scheduler.timesteps.cpu(), args.eta)
        if not bool((sigmas > 0).all()):
            raise ValueError(
                "the scheduler takes a noiseless final step (set_alpha_to_one=True), which has no log-prob; "
                "load a scheduler config with set_alpha_to_one=false"
            )
        vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        self.resolution = args.resolution or unet.config.sample_size * vae_scale
        self.latent_shape = (unet.config.in_channels, self.resolution // vae_scale, self.resolution // vae_scale)
        self.num_train_timesteps = max(1, int(args.num_inference_steps * args.timestep_fraction))
        self.num_generations = args.num_generations
        self.num_iterations = args.num_iterations
        # TRL's rule: the policy cannot have moved since the rollout, so old log-probs equal the current ones.
        self.policy_fixed_per_rollout = args.num_iterations == 1 and (
            args.steps_per_generation <= args.gradient_accumulation_steps
        )
        self._step = 0
        self._last_logged_step = 0
        self._buffered_inputs: list[dict[str, Any]] | None = None
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.model_accepts_loss_kwargs = False

    # ---- data -----------------------------------------------------------------------------------------------------
    def get_train_dataloader(self):
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        # Same seed on every process: the global rollout is identical everywhere and each process takes its slice,
        # so a prompt's group may span processes (advantages are computed on gathered rewards).
        return EpochSeededRepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=True,
            seed=self.args.seed,
        )

    # ---- sampling ---------------------------------------------------------------------------------------------------
    def _guided_noise_pred(
        self, model: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        """UNet prediction with classifier-free guidance, both branches in one batched call."""
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        if self.args.guidance_scale == 1.0:
            return model(latents, timesteps, encoder_hidden_states=cond).sample
        uncond = self.prompt_encoder([self.args.negative_prompt]).expand_as(cond)
        pred = model(
            torch.cat([latents, latents]),
            torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([uncond, cond]),
        ).sample
        pred_uncond, pred_cond = pred.chunk(2)
        return pred_uncond + self.args.guidance_scale * (pred_cond - pred_uncond)

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _global_randn(self, batch: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """This process's rows of a normal draw made for the whole global rollout: every process consumes the same
        random stream, so the samples do not depend on how the rollout is split across processes."""
        rank = self.accelerator.process_index
        noise = torch.randn((batch * self.accelerator.num_processes, *shape), generator=generator)
        return noise[rank * batch : (rank + 1) * batch].to(self.accelerator.device)

    def _initial_noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """x_T; with `same_initial_noise_per_group`, images of a group (possibly on several processes) share it."""
        if not self.args.same_initial_noise_per_group:
            return self._global_randn(batch, self.latent_shape, generator) * self.scheduler.init_noise_sigma
        rank, groups = self.accelerator.process_index, batch * self.accelerator.num_processes // self.num_generations
        noise = torch.randn((groups, *self.latent_shape), generator=generator).repeat_interleave(
            self.num_generations, 0
        )
        return noise[rank * batch : (rank + 1) * batch].to(self.accelerator.device) * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def _sample(self, model: torch.nn.Module, cond: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
        """Sample trajectories; returns latents x_t, x_{t-1} and log-probs per step, and the final latents."""
        args, batch = self.args, cond.shape[0]
        latents = self._initial_noise(batch, generator)
        chunk = args.sample_batch_size or batch
        trajectory, log_probs = [latents], []
        for t in tqdm(self.scheduler.timesteps, desc="rollout", leave=False, disable=not self.is_local_process_zero()):
            step_noise = self._global_randn(batch, self.latent_shape, generator)
            preds = [
                self._guided_noise_pred(model, latents[i : i + chunk], t, cond[i : i + chunk])
                for i in range(0, batch, chunk)
            ]
            step = ddim_step_with_logprob(self.scheduler, torch.cat(preds), t, latents, args.eta, noise=step_noise)
            latents = step.prev_sample
            trajectory.append(latents)
            log_probs.append(step.log_prob)
        return {
            "latents": torch.stack(trajectory[:-1], dim=1),
            "next_latents": torch.stack(trajectory[1:], dim=1),
            "log_probs": torch.stack(log_probs, dim=1),
            "final": latents,
        }

    def _generate_and_score_completions(self, generation_batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Sample the rollout, score it, and turn gathered rewards into this process's advantages."""
        device, args = self.accelerator.device, self.args
        prompts = [row["prompt"] for row in generation_batch]
        tags = [row["tag"] for row in generation_batch]
        batch = len(prompts)
        # Seeded from the optimizer step, so a resumed run draws the same noise as an uninterrupted one.
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + self.state.global_step)
        cond = self.prompt_encoder(prompts)
        model = self.model_wrapped
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        with self.compute_loss_context_manager():
            rollout = self._sample(model, cond, generator)
            images = self._decode(rollout["final"])
        sampling_time = time.perf_counter() - start
        model.train(was_training)

        start = time.perf_counter()
        scores = self.reward_stack(images, prompts, tags=tags, step=self.state.global_step)
        reward_time = time.perf_counter() - start

        rewards = self.accelerator.gather(scores.total)
        advantages, group_std = group_advantages(rewards, self.num_generations, args.scale_rewards)
        advantages = advantages.clamp(-args.adv_clip_max, args.adv_clip_max)
        rank = self.accelerator.process_index
        local_advantages = advantages[rank * batch : (rank + 1) * batch]

        m = self._metrics
        for name, values in scores.components.items():
            gathered = self.accelerator.gather(values)
            m[f"rewards/{name}/mean"].append(gathered.mean().item())
            m[f"rewards/{name}/std"].append(gathered.std().item() if gathered.numel() > 1 else 0.0)
        grouped_std = group_std.reshape(-1, self.num_generations)[:, 0]
        m["reward"].append(rewards.mean().item())
        m["reward_std"].append(grouped_std.mean().item())
        m["frac_reward_zero_std"].append((grouped_std < 1e-6).float().mean().item())
        m["advantages/abs_mean"].append(advantages.abs().mean().item())
        m["time/sampling"].append(sampling_time)
        m["time/reward"].append(reward_time)
        m["images_per_second"].append(batch * self.accelerator.num_processes / sampling_time)

        # A random subset of each trajectory's steps is trained on, drawn per image.
        order = self._global_randn(batch, (args.num_inference_steps,), generator).argsort(dim=1)
        return {
            "latents": rollout["latents"],
            "next_latents": rollout["next_latents"],
            "log_probs": rollout["log_probs"],
            "cond": cond,
            "advantages": local_advantages.to(device),
            "train_steps": order[:, : self.num_train_timesteps],
        }

    def _prepare_inputs(self, generation_batch: list[dict[str, Any]]) -> dict[str, Any]:
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            rollout = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = _split(rollout, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # ---- update -----------------------------------------------------------------------------------------------------
    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], j: int) -> torch.Tensor:
        """Clipped GRPO loss (plus β·KL) on the j-th trained step of every image in the micro-batch."""
        args = self.args
        rows = torch.arange(inputs["latents"].shape[0], device=inputs["latents"].device)
        step_index = inputs["train_steps"][:, j]
        x_t = inputs["latents"][rows, step_index]
        x_prev = inputs["next_latents"][rows, step_index]
        timesteps = self.scheduler.timesteps[step_index]
        cond = inputs["cond"]

        pred = self._guided_noise_pred(model, x_t, timesteps, cond)
        step = ddim_step_with_logprob(self.scheduler, pred, timesteps, x_t, args.eta, prev_sample=x_prev)
        rollout_log_prob = inputs["log_probs"][rows, step_index]
        if self.policy_fixed_per_rollout:
            old_log_prob = step.log_prob.detach()
            self._metrics["logprob_rollout_gap"].append((step.log_prob - rollout_log_prob).abs().max().item())
        else:
            old_log_prob = rollout_log_prob
        ratio = torch.exp(step.log_prob - old_log_prob)
        advantages = inputs["advantages"]
        clipped = torch.clamp(ratio, 1 - args.epsilon, 1 + args.epsilon)
        loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()

        if args.beta > 0:
            with torch.no_grad(), _adapters_disabled(self.accelerator.unwrap_model(model)):
                ref_pred = self._guided_noise_pred(model, x_t, timesteps, cond)
            ref = ddim_step_with_logprob(self.scheduler, ref_pred, timesteps, x_t, args.eta, prev_sample=x_prev)
            kl = gaussian_kl(step.mean, ref.mean, step.std).mean()
            loss = loss + args.beta * kl
            self._metrics["kl"].append(self.accelerator.gather(kl.detach()).mean().item())

        low = (ratio < 1 - args.epsilon) & (advantages < 0)
        high = (ratio > 1 + args.epsilon) & (advantages > 0)
        self._metrics["clip_ratio"].append(self.accelerator.gather((low | high).float().mean()).mean().item())
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch: backward per trained timestep, so activations of only one UNet call are held at once."""
        model.train()
        start = time.perf_counter()
        inputs = self._prepare_inputs(inputs)
        update_start = time.perf_counter()
        steps = self.num_train_timesteps
        # DeepSpeed steps its optimizer inside backward at a sync boundary: it gets a single backward per micro-batch.
        per_step_backward = self.accelerator.distributed_type != DistributedType.DEEPSPEED
        scale = steps * self.current_gradient_accumulation_steps
        total = torch.zeros((), device=self.args.device)
        deferred = []
        for j in range(steps):
            # Reduce gradients across processes once, after the last timestep of the micro-batch.
            sync = contextlib.nullcontext() if j == steps - 1 else self.accelerator.no_sync(model)
            with sync:
                with self.compute_loss_context_manager():
                    loss = self._compute_loss(model, inputs, j) / scale
                if per_step_backward:
                    self.accelerator.backward(loss)
                else:
                    deferred.append(loss)
            total += loss.detach()
        if deferred:
            self.accelerator.backward(torch.stack(deferred).sum(), scale_wrt_gas=False)
        self._metrics["time/update"].append(time.perf_counter() - update_start)
        self._metrics["time/step"].append(time.perf_counter() - start)
        self._step += 1
        return total

    # ---- logging and saving -----------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        metrics = {key: sum(values) / len(values) for key, values in self._metrics.items() if values}
        # Times are seconds per optimizer step: what the logging window spent, over the steps it holds.
        steps = max(1, self.state.global_step - self._last_logged_step)
        for key in ("time/sampling", "time/reward", "time/update", "time/step"):
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


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler with a shuffle that depends only on (seed, epoch): the Trainer calls `set_epoch`, so a
    resumed run replays exactly the prompts an uninterrupted one would have seen."""

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


def _split(rollout: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    size = rollout["advantages"].shape[0] // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in rollout.items()} for i in range(parts)]


@contextlib.contextmanager
def _adapters_disabled(unet: torch.nn.Module):
    """The base model = the UNet with its LoRA adapter switched off (no second UNet in memory)."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


__all__: Sequence[str] = ["DiffusionGRPOTrainer"]
