"""ESD (Erased Stable Diffusion, Gandikota et al. 2023): the model learns to predict, for the concept prompt c, the
frozen model's noise guided away from c.

Each micro-batch of concept prompts: sample x_T; denoise with the current model (no grad, DDIM, CFG
`start_guidance`) down to a stop step k drawn uniformly from the schedule → z; draw a training timestep t inside step
k's interval; with the adapter off: e_0 = ε(z, t, ""), e_c = ε(z, t, c); with grad: e_n = ε_θ(z, t, c);
loss = MSE(e_n, e_0 − η (e_c − e_0)).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from ..sampling import ddim_step
from .base import MicroBatchTrainer, adapters_disabled
from .esd_config import ESDConfig


def esd_target(e_0: torch.Tensor, e_c: torch.Tensor, negative_guidance: float) -> torch.Tensor:
    """ε(z, t) − η (ε(z, t, c) − ε(z, t)): the unconditional prediction guided away from the concept."""
    return e_0 - negative_guidance * (e_c - e_0)


def training_timesteps(scheduler, k: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` training timesteps drawn uniformly inside DDIM step k's interval: the timesteps from z's noise level
    t_k down to just above the next step's t_k − 1000/N (clipped at 0)."""
    t_k = int(scheduler.timesteps[k])
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    low = max(t_k - stride + 1, 0)
    return torch.randint(low, t_k + 1, (count,), generator=generator)


class ESDTrainer(MicroBatchTrainer):
    """Trains a LoRA adapter on `pipeline.unet` with ESD. Needs no rewards.

    Args:
        pipeline: a Stable Diffusion pipeline (see `rl_safety.pipelines.load_pipeline`); its UNet receives the adapter.
        args: the configuration.
        train_dataset: a `datasets.Dataset` with `prompt` and `tag` columns; the `erase_prompts_tag` rows are used.
        reward_stack: unused (None); accepted so every trainer has the same signature.
    """

    _tag_names = ["rl_safety", "esd"]

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        args: ESDConfig,
        train_dataset,
        reward_stack=None,
        callbacks=None,
    ):
        tag = args.erase_prompts_tag
        concept_rows = train_dataset.filter(lambda row: row["tag"] == tag)
        if len(concept_rows) == 0:
            present = sorted(set(train_dataset["tag"]))
            raise ValueError(
                f"erase_prompts_tag={tag!r}: no train_prompts row has this tag (tags present: {', '.join(present)})"
            )
        super().__init__(pipeline, args, concept_rows, reward_stack, callbacks=callbacks)
        self._update_start = 0.0

    # ---- hooks ----------------------------------------------------------------------------------------------------
    def _erase_condition(self, prompts: list[str], cond: torch.Tensor) -> torch.Tensor:
        """The conditioning of the trained prediction e_n: the concept prompts' own embeddings, or with `adv_train`
        (RACE's ESD setting) their adversarial embeddings for the rows the pool picks; the target keeps the clean
        prompt, so the model learns to answer the attack as it answers the erased prompt."""
        tags = [self.args.erase_prompts_tag] * len(prompts)
        return self._adversarial_condition(prompts, tags, cond)[0]

    # ---- loss -----------------------------------------------------------------------------------------------------
    def _sample_until(self, model, cond: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """x_T denoised by the current model (no grad) through the first k DDIM steps: z at timestep t_k."""
        args = self.args
        batch = cond.shape[0]
        latents = self._global_randn(batch, self.latent_shape, generator) * self.scheduler.init_noise_sigma
        with torch.no_grad():
            steps = self.scheduler.timesteps[:k]
            for t in self._progress(steps, "sampling"):
                noise = self._global_randn(batch, self.latent_shape, generator) if args.eta > 0 else None
                pred = self._guided_noise_pred(model, latents, t, cond, guidance_scale=args.start_guidance)
                latents = ddim_step(self.scheduler, pred, t, latents, args.eta, noise=noise).prev_sample
        return latents

    def esd_loss(self, model, rows: list[dict[str, Any]], generator: torch.Generator) -> torch.Tensor:
        args = self.args
        prompts = [row["prompt"] for row in rows]
        batch = len(prompts)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        dtype = self.pipeline.unet.dtype
        cond = self.prompt_encoder(prompts)
        uncond = self.prompt_encoder([""]).expand_as(cond)
        # The same draws on every process (see _global_randn): k, the global batch's noise and timesteps.
        k = int(torch.randint(args.num_inference_steps, (1,), generator=generator))
        start = time.perf_counter()
        z = self._sample_until(model, cond, k, generator)
        self._metrics["time/sampling"].append(time.perf_counter() - start)
        self._update_start = time.perf_counter()
        t = training_timesteps(self.scheduler, k, batch * world, generator)[rank * batch : (rank + 1) * batch]
        t = t.to(z.device)
        z_in = z.to(dtype)
        with torch.no_grad(), adapters_disabled(self.accelerator.unwrap_model(model)):
            base = model(
                torch.cat([z_in, z_in]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]).to(dtype)
            ).sample.float()
        e_0, e_c = base.chunk(2)
        erase_cond = self._erase_condition(prompts, cond)
        e_n = model(z_in, t, encoder_hidden_states=erase_cond.to(dtype)).sample.float()
        loss = F.mse_loss(e_n, esd_target(e_0, e_c, args.negative_guidance))
        self._metrics["loss/esd"].append(self.accelerator.gather(loss.detach()).mean().item())
        self._metrics["stop_step"].append(float(k))
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """MSE(ε_θ(z, t, c), ε(z, t) − η (ε(z, t, c) − ε(z, t))), seeded by (seed, micro-step)."""
        generator = self._micro_step_generator()
        return self.esd_loss(model, inputs, generator)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._metrics["time/update"].append(time.perf_counter() - self._update_start)
        return loss
