"""What every rl_safety trainer shares: a LoRA adapter on the pipeline's UNet, the frozen components on the device,
cached prompt embeddings, guided UNet calls, decoding, seeded global noise, logging and adapter checkpoints.

Each method (`grpo.py`, `refl.py`) subclasses `DiffusionTrainer` and writes its own `training_step`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.configuration_utils import FrozenDict
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import RepeatSampler

from rl_safety.rewards import RewardStack

from ..attack.pool import AdversarialPool
from ..checkpoints import mark_complete, rotate_complete_checkpoints
from ..pipelines import PromptEncoder, adapters_disabled, add_lora, load_lora_into, save_lora
from ..sampling import ddim_step
from .base_config import DiffusionTrainingConfig


def _collate(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return features


class TrackableConfig(FrozenDict):
    """A diffusers model config (still a `FrozenDict`, so diffusers reads it as before) that also answers
    `to_dict()` and `to_json_string()`, the two `PretrainedConfig` methods transformers' tracker callbacks call on
    `model.config` when training begins: TensorBoard's `to_json_string()` (which a plain FrozenDict lacks: the crash
    of `--report_to tensorboard`), and `to_dict()` in W&B's end-of-run model upload and the MLflow, Comet, Neptune
    and ClearML callbacks. W&B and trackio take a dict as is."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"


def expose_config_to_trackers(model: torch.nn.Module) -> None:
    """Give a diffusers model's `config` the `PretrainedConfig` methods trackers call (see `TrackableConfig`)."""
    config = getattr(model, "_internal_dict", None)
    if isinstance(config, FrozenDict) and not isinstance(config, TrackableConfig):
        model._internal_dict = TrackableConfig(config)


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
        expose_config_to_trackers(unet)
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
        self._images_drawn = 0  # images sampled (all processes) since the last log; a trainer that samples counts them
        self.model_accepts_loss_kwargs = False
        self.adversarial_pool = self._build_adversarial_pool() if args.adv_train else None

    # ---- adversarial training (RACE) --------------------------------------------------------------------------------
    def _build_adversarial_pool(self) -> AdversarialPool:
        args = self.args
        prompts = sorted({row["prompt"] for row in self.train_dataset if row["tag"] == args.adv_prompts_tag})
        if not prompts:
            raise ValueError(
                f"adv_prompts_tag={args.adv_prompts_tag!r}: no train prompt has that tag, so adv_train has nothing "
                "to attack; tag the concept prompts (e.g. a file named unsafe.txt) or set adv_prompts_tag"
            )
        clean = self.prompt_encoder(prompts).float()
        latents = self._concept_latents(clean, args.adv_num_concept_images, torch.Generator().manual_seed(args.seed))
        return AdversarialPool(
            prompts,
            clean,
            latents,
            epsilon=args.adv_epsilon,
            step_size=args.pgd_step_size,
            num_steps=args.pgd_num_step,
            objective=args.adv_objective,
            refresh_steps=args.adv_refresh_steps,
            share=args.adv_share,
            seed=args.seed,
            start_step=args.adv_start_step,
        )

    @torch.no_grad()
    def _concept_latents(self, cond: torch.Tensor, per_prompt: int, generator: torch.Generator) -> torch.Tensor:
        """(P, K, C, h, w) final latents the base model draws for each prompt (deterministic DDIM, recipe's CFG)."""
        unet = self.accelerator.unwrap_model(self.model)
        prompts = cond.shape[0]
        cond = cond.repeat(per_prompt, 1, 1)
        noise = torch.randn((len(cond), *self.latent_shape), generator=generator) * self.scheduler.init_noise_sigma
        chunk = self.args.sample_batch_size or len(cond)
        finals = []
        with adapters_disabled(unet):
            for start in range(0, len(cond), chunk):
                latents = noise[start : start + chunk].to(self.accelerator.device)
                part = cond[start : start + chunk]
                for t in self.scheduler.timesteps:
                    pred = self._guided_noise_pred(unet, latents, t, part)
                    latents = ddim_step(self.scheduler, pred, t, latents, 0.0).prev_sample
                finals.append(latents)
        latents = torch.cat(finals)
        return latents.view(per_prompt, prompts, *latents.shape[1:]).transpose(0, 1).contiguous()

    def _adversarial_condition(
        self, prompts: list[str], tags: list[str], cond: torch.Tensor
    ) -> tuple[torch.Tensor, list[str]]:
        """With `adv_train`: refresh the pool when due, then swap the chosen rows to their adversarial embeddings."""
        pool = self.adversarial_pool
        if pool is None:
            return cond, tags
        step = self.state.global_step
        if not pool.active(step):
            return cond, tags
        if pool.due(step):
            unet = self.accelerator.unwrap_model(self.model)
            was_training = unet.training
            unet.eval()
            pool.refresh(unet, self.scheduler, step, lambda: adapters_disabled(unet))
            unet.train(was_training)
            if self.accelerator.num_processes > 1:
                pool.embeddings = broadcast(pool.embeddings.contiguous(), from_process=0)
            self._metrics["adversarial/attack_loss"].append(pool.last_loss)
        cond, tags = pool.apply(prompts, tags, cond, step)
        self._metrics["adversarial/share"].append(sum(t == "adversarial" for t in tags) / max(1, len(tags)))
        return cond, tags

    # ---- progress ---------------------------------------------------------------------------------------------------
    def _progress(self, iterable, desc: str):
        """A transient tqdm bar over `iterable` on the local main process, off with `disable_tqdm` (as Trainer's)."""
        disable = self.args.disable_tqdm or not self.is_local_process_zero()
        return tqdm(iterable, desc=desc, leave=False, disable=disable)

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
        # The whole iteration's rate (sampling, rewards and update): images drawn over the window's `time/step`
        # seconds; `sampling/images_per_second` is the sampler's alone.
        step_seconds = sum(self._metrics.get("time/step", []))
        if self._images_drawn and step_seconds > 0:
            metrics["images_per_second"] = self._images_drawn / step_seconds
        self._images_drawn = 0
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
        if self.adversarial_pool is not None:
            self.adversarial_pool.load(resume_from_checkpoint)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint plus this trainer's own state, marked complete only once every process has
        written its part (see `checkpoints.py`), so a kill during the save never leaves a folder `last` resumes."""
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.exists():
            shutil.rmtree(folder)  # the remains of an interrupted save of this step
        self.accelerator.wait_for_everyone()
        folder.mkdir(parents=True, exist_ok=True)
        self._save_trainer_state(folder)
        # Rotation waits for the completion mark: deleting the previous checkpoint before this one is whole would
        # leave nothing to resume from if the save were interrupted.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(folder, self.state.global_step)
            rotate_complete_checkpoints(run_dir, limit)

    def _save_trainer_state(self, folder: Path) -> None:
        """State of this trainer that transformers does not save; every process calls it."""
        # The pool in use was found against a policy that a resumed run no longer has.
        if self.adversarial_pool is not None and self.args.should_save:
            self.adversarial_pool.save(folder)

    def create_model_card(self, *args, **kwargs) -> None:
        """The card is written by the train script, which knows the recipe and rewards (see `outputs.py`)."""

    # ---- Hub --------------------------------------------------------------------------------------------------------
    # With `push_to_hub: true`, transformers.Trainer pushes on its own: it creates the repository in __init__
    # (`init_hf_repo`), uploads output_dir at every checkpoint (`_push_from_checkpoint`, per `hub_strategy`) and on
    # every `save_model()`. A run is published once, at the end, after the model card and the evaluation are written,
    # with the files `rl-safety push` uploads; so those three hooks do nothing here, and `push_to_hub()` uploads
    # through `rl_safety.hub.push` (the train script calls it on the main process after the evaluation).
    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        self.hub_model_id = self.args.hub_model_id  # the repository is created by the push, not before training
        self.push_in_progress = None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """No upload per checkpoint (see above)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=True)  # `_internal_call=False` would push (see above)

    def push_to_hub(
        self, commit_message: str | None = None, token: str | None = None, private: bool | None = None, **kwargs
    ) -> str | None:
        """Upload output_dir (adapter, model card, config.yaml, eval/) to `args.hub_model_id`, from the main process;
        returns the repository URL. A failure is a one-line `ConfigError` naming the `rl-safety push` to rerun."""
        from ..hub import push

        if not self.is_world_process_zero():
            return None
        return push(
            self.args.output_dir,
            self.args.hub_model_id,
            private=bool(self.args.hub_private_repo if private is None else private),
            token=token or self.args.hub_token,
            commit_message=commit_message,
        )


class MicroBatchTrainer(DiffusionTrainer):
    """A trainer whose every micro-batch is one loss on a slice of a seeded global batch (ReFL, ESD): the draws of a
    micro-batch are a function of (seed, micro-step) alone, so resume is exact and N processes equal one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._accumulated = 0  # micro-batches of the current optimizer step done so far (seeds each micro-step)

    def _get_train_sampler(self, dataset=None):
        # One seeded order for every process; accelerate hands each process its consecutive slice of a global batch.
        global_batch = self._train_batch_size * self.accelerator.num_processes
        return EpochSeededSampler(len(self.train_dataset), global_batch, self.args.seed)

    def _micro_step(self) -> int:
        return self.state.global_step * self.args.gradient_accumulation_steps + self._accumulated

    def _micro_step_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.args.seed * 1_000_003 + self._micro_step())

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        start = time.perf_counter()
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs) / self.current_gradient_accumulation_steps
        self.accelerator.backward(loss)
        self._metrics["time/step"].append(time.perf_counter() - start)
        self._accumulated = (self._accumulated + 1) % self.args.gradient_accumulation_steps
        return loss.detach()


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
