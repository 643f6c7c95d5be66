"""What the attack minimises: the attacked model's noise prediction under the adversarial embedding, on concept
latents noised at random timesteps, against a target.

- `race` (RACE, Kim et al. 2024): the target is the noise itself — the embedding that best denoises concept images
  is one that makes the model draw the concept.
- `unlearndiff` (UnlearnDiffAtk, Zhang et al. 2024): the target is the base model's prediction for the clean concept
  prompt — the embedding that makes the erased model behave like the model before erasure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OBJECTIVES = ("race", "unlearndiff")


def noised(
    scheduler, latents: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, noise, timesteps): each row noised at its own uniform training timestep."""
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps, noise = timesteps.to(latents.device), noise.to(latents)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def attack_loss(
    objective: str,
    unet: torch.nn.Module,
    scheduler,
    concept_latents: torch.Tensor,
    clean: torch.Tensor,
    generator: torch.Generator,
    base_unet_context: Callable,
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`loss(embeddings, step)` → (P,) MSE per prompt, fresh timesteps and noise at every step.

    `concept_latents` is (P, K, C, h, w): K concept images per prompt. `base_unet_context()` is a context manager
    under which `unet` is the base model (the adapter disabled); only the `unlearndiff` target uses it.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    prompts, per_prompt = concept_latents.shape[:2]
    latents = concept_latents.flatten(0, 1)
    dtype = next(unet.parameters()).dtype

    def loss(embeddings: torch.Tensor, step: int) -> torch.Tensor:
        noisy, noise, timesteps = noised(scheduler, latents, generator)
        cond = embeddings.repeat_interleave(per_prompt, 0)
        if objective == "race":
            target = noise
        else:
            with torch.no_grad(), base_unet_context():
                base_cond = clean.repeat_interleave(per_prompt, 0).to(dtype)
                target = unet(noisy.to(dtype), timesteps, encoder_hidden_states=base_cond).sample.float()
        pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states=cond.to(dtype)).sample.float()
        return (pred - target).pow(2).flatten(1).mean(1).view(prompts, per_prompt).mean(1)

    return loss
