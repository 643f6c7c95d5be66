"""Paired sampling for evaluations: every model draws a prompt set from the same initial noise per seed, so base,
adapters and baselines compare image by image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionPipeline


def generate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    eta: float = 0.0,
    batch_size: int = 256,
    prompt_embeds: torch.Tensor | None = None,
    output_type: str = "pt",
    **pipeline_kwargs,
) -> torch.Tensor:
    """(len(seeds) * len(prompts), 3, H, W) images in [0, 1], seed-major. An image's initial noise depends on the seed
    and the prompt's position in the set only, so two models given the same call draw paired images; with eta > 0
    the later noise also depends on `batch_size`. `prompt_embeds` (one row per prompt) replaces the text encoder's
    output (an attack's embeddings); `output_type="latent"` returns the final latents instead of images; other keyword
    arguments go to the pipeline call (`negative_prompt`, SLD's `sld_*`)."""
    unet = pipe.unet
    size = unet.config.sample_size
    images = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn(len(prompts), unet.config.in_channels, size, size, generator=generator)
        for start in range(0, len(prompts), batch_size):
            part = slice(start, start + batch_size)
            text = {"prompt": list(prompts[part])}
            if prompt_embeds is not None:
                text = {"prompt_embeds": prompt_embeds[part].to(pipe.device, unet.dtype)}
            out = pipe(
                **text,
                latents=latents[part].to(pipe.device, unet.dtype),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                eta=eta,
                generator=generator,
                output_type=output_type,
                **_per_prompt(pipeline_kwargs, len(latents[part])),
            ).images
            if not isinstance(out, torch.Tensor):  # pipelines that only return numpy (SLD's): (B, H, W, C)
                out = torch.from_numpy(out).permute(0, 3, 1, 2)
            images.append(out.float().cpu())
    return torch.cat(images)


def _per_prompt(kwargs: dict, count: int) -> dict:
    """A single negative prompt repeated for every prompt of the call (diffusers wants one per prompt)."""
    negative = kwargs.get("negative_prompt")
    return {**kwargs, "negative_prompt": [negative] * count} if isinstance(negative, str) else kwargs
