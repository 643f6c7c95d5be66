"""GRPO for text-to-image diffusion: group-relative advantages over images sampled per prompt, a clipped objective
on the per-step log-probs of a stochastic DDIM sampler, and an optional KL to the base model (adapter disabled).

The trainer follows TRL's `GRPOTrainer` layout: the dataloader yields a whole rollout's prompts (each repeated
`num_generations` times, groups possibly spanning processes), `_prepare_inputs` samples and scores them once every
`steps_per_generation × num_iterations` micro-steps and buffers the slices, and `training_step` computes the loss.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from rl_safety.rewards import RewardStack

from ..advantages import group_advantages
from ..sampling import ddim_std, ddim_step_with_logprob, gaussian_kl
from .base import DiffusionTrainer, adapters_disabled
from .grpo_config import DiffusionGRPOConfig


def noiseless_step_error(scheduler: DDIMScheduler, eta: float) -> str | None:
    """Why some step of the schedule has σ = 0 (no log-prob), naming the scheduler setting that causes it; or None."""
    timesteps = scheduler.timesteps.cpu()
    sigmas = ddim_std(scheduler, timesteps, eta)
    if bool((sigmas > 0).all()):
        return None
    index = int((sigmas <= 0).nonzero()[0])
    t = int(timesteps[index])
    config = scheduler.config
    # At t > 0 a step is noiseless only when it lands on alpha = 1, which only set_alpha_to_one produces.
    if t > 0 and config.set_alpha_to_one:
        return (
            f"the scheduler's final step (t={t}) goes to alpha=1 (set_alpha_to_one=True), which is noiseless and has "
            "no log-prob; load a scheduler config with set_alpha_to_one=false"
        )
    return (
        f"step {index} of the schedule (t={t}) is noiseless and has no log-prob: with timestep_spacing="
        f"{config.timestep_spacing!r} and steps_offset={config.steps_offset} the schedule reaches t=0, whose step "
        "to the final alpha has zero variance; use timestep_spacing='leading' with steps_offset=1 (SD's own "
        "scheduler config) or 'trailing'"
    )


class DiffusionGRPOTrainer(DiffusionTrainer):
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
        super().__init__(pipeline, args, train_dataset, reward_stack, callbacks=callbacks)
        problem = noiseless_step_error(self.scheduler, args.eta)
        if problem:
            raise ValueError(problem)
        self.num_train_timesteps = max(1, int(args.num_inference_steps * args.timestep_fraction))
        self.num_generations = args.num_generations
        self.num_iterations = args.num_iterations
        self.generate_every = args.steps_per_generation * args.num_iterations
        # TRL's rule: when every rollout is used up within one optimizer step, the policy cannot have moved since
        # it was drawn, so the old log-probs equal the current ones (the ratio is exactly 1).
        self.policy_fixed_per_rollout = args.gradient_accumulation_steps % self.generate_every == 0
        self._step: int | None = None  # micro-steps taken; set from global_step when training (re)starts
        self._buffered_inputs: list[dict[str, Any]] | None = None

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
        # A prompt's group may span processes: advantages are computed on gathered rewards.
        return self._prompt_sampler(
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
        )

    # ---- sampling ---------------------------------------------------------------------------------------------------
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
    def _sample(
        self,
        model: torch.nn.Module,
        cond: torch.Tensor,
        generator: torch.Generator,
        sample_cond: torch.Tensor | None = None,
        explore: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Sample trajectories; returns latents x_t, x_{t-1} and log-probs per step, and the final latents.

        Rows marked in `explore` are drawn with `sample_cond` (their exploration prompt), by the base model when
        `explore_from_base`; every log-prob is the policy's under `cond`, the condition the loss trains, so these
        rows enter the update like the others."""
        args, batch = self.args, cond.shape[0]
        rows = None if explore is None or not explore.any() else explore.nonzero().flatten().to(cond.device)
        latents = self._initial_noise(batch, generator)
        chunk = args.sample_batch_size or batch
        trajectory, log_probs = [latents], []
        for t in self._progress(self.scheduler.timesteps, "rollout"):
            step_noise = self._global_randn(batch, self.latent_shape, generator)
            policy = torch.cat(
                [
                    self._guided_noise_pred(model, latents[i : i + chunk], t, cond[i : i + chunk])
                    for i in range(0, batch, chunk)
                ]
            )
            pred = policy
            if rows is not None:
                base = adapters_disabled(self.accelerator.unwrap_model(model))
                with base if args.explore_from_base else contextlib.nullcontext():
                    behaviour = self._guided_noise_pred(model, latents[rows], t, sample_cond[rows])
                pred = policy.index_copy(0, rows, behaviour)
            step = ddim_step_with_logprob(self.scheduler, pred, t, latents, args.eta, noise=step_noise)
            log_prob = step.log_prob
            if rows is not None:
                own = ddim_step_with_logprob(
                    self.scheduler, policy[rows], t, latents[rows], args.eta, prev_sample=step.prev_sample[rows]
                )
                log_prob = log_prob.index_copy(0, rows, own.log_prob)
            latents = step.prev_sample
            trajectory.append(latents)
            log_probs.append(log_prob)
        return {
            "latents": torch.stack(trajectory[:-1], dim=1),
            "next_latents": torch.stack(trajectory[1:], dim=1),
            "log_probs": torch.stack(log_probs, dim=1),
            "final": latents,
        }

    def _exploration_rows(self, tags: list[str]) -> torch.Tensor:
        """Which local rows are drawn from their exploration prompt: the last `explore_generations` images of each
        group of a prompt tagged one of `explore_prompts_tags` (groups are consecutive in the global batch)."""
        rank, batch, k = self.accelerator.process_index, len(tags), self.args.explore_generations
        position = (torch.arange(batch) + rank * batch) % self.num_generations
        wanted = self.args.explore_prompts_tags
        tagged = torch.tensor([tag in wanted if wanted else tag != "adversarial" for tag in tags])
        return tagged & (position >= self.num_generations - k)

    @staticmethod
    def _tagged(tags: list[str], wanted: list[str] | None) -> torch.Tensor:
        """Rows whose tag is one of `wanted` (every row when None)."""
        return torch.tensor([wanted is None or tag in wanted for tag in tags], dtype=torch.bool)

    def _generate_and_score_completions(self, generation_batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Sample the rollout, score it, and turn gathered rewards into this process's advantages."""
        device, args = self.accelerator.device, self.args
        prompts = [row["prompt"] for row in generation_batch]
        tags = [row["tag"] for row in generation_batch]
        batch = len(prompts)
        # Seeded from the rollout's index (a function of the micro-step, restored on resume), so several rollouts
        # within one optimizer step draw different noise and a resumed run draws what an uninterrupted one would.
        rollout_index = self._step // self.generate_every
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + rollout_index)
        cond, tags = self._adversarial_condition(prompts, tags, self.prompt_encoder(prompts))
        model = self.model_wrapped
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        with self.compute_loss_context_manager():
            explore, sample_cond = None, cond
            if args.explore_generations:
                explore = self._exploration_rows(tags)
                words = args.explore_drop_words
                dropped = {i: drop_words(prompts[i], words) for i in explore.nonzero().flatten().tolist()}
                if not args.explore_from_base:
                    # The policy exploring a prompt that has no drop word would only redraw its own image.
                    for i in [i for i, text in dropped.items() if text == prompts[i]]:
                        explore[i] = False
                        del dropped[i]
                sample_cond = cond.clone()
                if dropped:
                    rows = torch.tensor(list(dropped), device=cond.device)
                    sample_cond[rows] = self.prompt_encoder(list(dropped.values())).to(cond.dtype)
            rollout = self._sample(model, cond, generator, sample_cond, explore)
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
        if explore is not None:
            # How much better the exploration images score than the policy's own in the same groups: the signal
            # exploration adds (≤ 0 once the policy draws what exploration shows).
            explored = self.accelerator.gather(explore.to(device).long()).bool().reshape(-1, self.num_generations)
            grouped = rewards.reshape(-1, self.num_generations)
            with_both = explored.any(dim=1)
            if with_both.any():
                mean_explored = (grouped * explored).sum(1) / explored.sum(1).clamp(min=1)
                mean_policy = (grouped * ~explored).sum(1) / (~explored).sum(1)
                m["explore/reward_gap"].append((mean_explored - mean_policy)[with_both].mean().item())
            m["explore/share"].append(explored.float().mean().item())
        m["time/sampling"].append(sampling_time)
        m["time/reward"].append(reward_time)
        images_drawn = batch * self.accelerator.num_processes
        m["sampling/images_per_second"].append(images_drawn / sampling_time)
        self._images_drawn += images_drawn  # images_per_second: over the whole step's time (see DiffusionTrainer.log)

        # A random subset of each trajectory's steps is trained on, drawn per image.
        order = self._global_randn(batch, (args.num_inference_steps,), generator).argsort(dim=1)
        return {
            "latents": rollout["latents"],
            "next_latents": rollout["next_latents"],
            "log_probs": rollout["log_probs"],
            "cond": cond,
            "kl_rows": self._tagged(tags, args.beta_prompts_tags).to(device),
            "advantages": local_advantages.to(device),
            "train_steps": order[:, : self.num_train_timesteps],
        }

    def _prepare_inputs(self, generation_batch: list[dict[str, Any]]) -> dict[str, Any]:
        if self._step is None:
            # Training starts or resumes at a rollout boundary (checkpoints are saved after optimizer steps, and a
            # rollout never spans an optimizer step unless it is reused within the next ones: see generate_every).
            self._step = self.state.global_step * self.args.gradient_accumulation_steps
        if self._step % self.generate_every == 0 or self._buffered_inputs is None:
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
            kl_rows = inputs["kl_rows"].nonzero().flatten()
            kl_sum = torch.zeros((), device=x_t.device)
            if kl_rows.numel():
                with torch.no_grad(), adapters_disabled(self.accelerator.unwrap_model(model)):
                    ref_pred = self._guided_noise_pred(model, x_t[kl_rows], timesteps[kl_rows], cond[kl_rows])
                ref = ddim_step_with_logprob(
                    self.scheduler, ref_pred, timesteps[kl_rows], x_t[kl_rows], args.eta, prev_sample=x_prev[kl_rows]
                )
                kl_sum = gaussian_kl(step.mean[kl_rows], ref.mean, step.std[kl_rows]).sum()
            # Averaged over all rows, so β weighs a row's KL the same whichever rows it applies to.
            loss = loss + args.beta * kl_sum / len(rows)
            count = torch.tensor(float(kl_rows.numel()), device=x_t.device)
            total, count = self.accelerator.gather(torch.stack([kl_sum.detach(), count])).reshape(-1, 2).sum(0)
            if count > 0:
                self._metrics["kl"].append((total / count).item())

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

    # ---- checkpoints: a rollout still in use is part of the state ------------------------------------------------
    def _buffer_path(self, checkpoint: str) -> Path:
        return Path(checkpoint) / f"rollout_buffer-rank{self.accelerator.process_index}.safetensors"

    def _save_trainer_state(self, folder: Path) -> None:
        # With num_iterations > 1 (or rollouts spanning optimizer steps) a checkpoint can fall inside a rollout's
        # reuse; it cannot be re-sampled on resume (the policy that drew it is gone), so it is saved.
        super()._save_trainer_state(folder)
        if self._step is not None and self._step % self.generate_every and self._buffered_inputs is not None:
            flat = {
                f"{i}.{k}": v.contiguous() for i, part in enumerate(self._buffered_inputs) for k, v in part.items()
            }
            save_file(flat, self._buffer_path(folder))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = self._buffer_path(resume_from_checkpoint)
        if path.is_file():
            parts: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in load_file(path, device=str(self.accelerator.device)).items():
                index, name = key.split(".", 1)
                parts.setdefault(int(index), {})[name] = value
            self._buffered_inputs = [parts[i] for i in sorted(parts)]


def drop_words(prompt: str, words: Sequence[str]) -> str:
    """`prompt` without the whole words in `words` (any case), spaces tidied: 'a red circle' → 'a circle'."""
    for word in words:
        prompt = re.sub(rf"\b{re.escape(word)}\b", " ", prompt, flags=re.IGNORECASE)
    return " ".join(prompt.split())


def _split(rollout: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    size = rollout["advantages"].shape[0] // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in rollout.items()} for i in range(parts)]


__all__: Sequence[str] = ["DiffusionGRPOTrainer"]
