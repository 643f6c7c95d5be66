"""Stochastic DDIM step with the log-probability of the transition it takes (the GRPO policy step).

Pure tensor functions: no model, no I/O. The mean is the one `diffusers.DDIMScheduler.step` computes, so a policy
trained here samples exactly like the stock pipeline with the same `eta`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler


@dataclass
class DDIMStepOutput:
    prev_sample: torch.Tensor
    log_prob: torch.Tensor | None  # (B,), mean over latent dimensions; None from `ddim_step`
    mean: torch.Tensor
    std: torch.Tensor  # (B, 1, 1, 1)
    pred_original_sample: torch.Tensor  # the predicted x0, as diffusers' step returns it


def _alphas(scheduler: DDIMScheduler, timesteps: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ᾱ_t and ᾱ_prev per sample, shaped to broadcast over a (B, ...) tensor of `ndim` dims."""
    prev = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=timesteps.device, dtype=torch.float32)
    alpha_t = alphas[timesteps]
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
    shape = (-1,) + (1,) * (ndim - 1)
    return alpha_t.reshape(shape), alpha_prev.reshape(shape)


def ddim_std(scheduler: DDIMScheduler, timesteps: torch.Tensor, eta: float) -> torch.Tensor:
    """σ_t = eta · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)) for each timestep in `timesteps` (shape (B,))."""
    alpha_t, alpha_prev = _alphas(scheduler, torch.as_tensor(timesteps).long().reshape(-1), 1)
    return eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std²) averaged over every dimension but the batch one."""
    log_density = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, x.ndim)))


def ddim_step(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DDIMStepOutput:
    """One DDIM step x_t → x_{t−1} (`log_prob` is None; see `ddim_step_with_logprob`), differentiable in
    `model_output`.

    `timesteps` is an int or a (B,) tensor (samples may sit at different timesteps). x_{t−1} = mean + σ·noise, with
    `noise` drawn from `generator` when not given (and σ = 0 for eta = 0); a given `prev_sample` is kept as is.
    """
    if scheduler.config.thresholding:
        raise ValueError("scheduler.config.thresholding=True is not supported by the sampler; set it to false.")
    batch = sample.shape[0]
    timesteps = torch.as_tensor(timesteps, device=sample.device).long().reshape(-1).expand(batch)
    alpha_t, alpha_prev = _alphas(scheduler, timesteps, sample.ndim)
    beta_t = 1 - alpha_t
    dtype = sample.dtype
    model_output, sample = model_output.float(), sample.float()

    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        pred_eps = model_output
    elif prediction_type == "v_prediction":
        pred_x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        pred_eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (sample - alpha_t.sqrt() * pred_x0) / beta_t.sqrt()
    else:
        raise ValueError(f"scheduler prediction_type={prediction_type!r}: expected epsilon, v_prediction or sample")
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-limit, limit)

    variance = (1 - alpha_prev) / beta_t * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std**2).sqrt() * pred_eps

    if prev_sample is None:
        if eta > 0:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            prev_sample = mean + std * noise
        else:
            prev_sample = mean
    return DDIMStepOutput(
        prev_sample=prev_sample.to(dtype), log_prob=None, mean=mean, std=std, pred_original_sample=pred_x0
    )


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DDIMStepOutput:
    """One stochastic DDIM step x_t → x_{t−1} and log p(x_{t−1} | x_t) (eta must be > 0).

    With `prev_sample` given (the update phase), the log-prob of that stored transition is returned; otherwise
    x_{t−1} = mean + σ·noise, with `noise` drawn from `generator` when not given.
    """
    step = ddim_step(scheduler, model_output, timesteps, sample, eta, prev_sample, noise, generator)
    step.log_prob = gaussian_log_prob(step.prev_sample.float(), step.mean, step.std)
    return step


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, σ²) ‖ N(ref_mean, σ²)) = ‖mean − ref_mean‖² / (2σ²), averaged per sample over latent dims."""
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, mean.ndim)))
