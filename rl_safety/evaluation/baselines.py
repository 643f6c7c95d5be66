"""Erasure baselines that change how the base model samples, not its weights: a negative prompt naming the concept,
and Safe Latent Diffusion (Schramowski et al. 2023, diffusers' `StableDiffusionPipelineSafe`) steering away from it.
They stand in the evaluation beside the trained adapters, on the same prompts, seeds and judges."""

from __future__ import annotations

from typing import Any

from diffusers import StableDiffusionPipeline, StableDiffusionPipelineSafe

BASELINES = ("negative_prompt", "sld")
# The SLD paper's configurations (its Table 1; the names diffusers' docs use).
SLD_PRESETS = {
    "weak": dict(
        sld_guidance_scale=200, sld_warmup_steps=15, sld_threshold=0.0, sld_momentum_scale=0.0, sld_mom_beta=0.0
    ),
    "medium": dict(
        sld_guidance_scale=1000, sld_warmup_steps=10, sld_threshold=0.01, sld_momentum_scale=0.3, sld_mom_beta=0.4
    ),
    "strong": dict(
        sld_guidance_scale=2000, sld_warmup_steps=7, sld_threshold=0.025, sld_momentum_scale=0.5, sld_mom_beta=0.7
    ),
    "max": dict(
        sld_guidance_scale=5000, sld_warmup_steps=0, sld_threshold=1.0, sld_momentum_scale=0.5, sld_mom_beta=0.7
    ),
}


def baseline_sampler(
    name: str, pipe: StableDiffusionPipeline, concept: str, sld_preset: str = "medium"
) -> tuple[StableDiffusionPipeline, dict[str, Any]]:
    """The pipeline that samples baseline `name` (sharing `pipe`'s components) and the extra call arguments."""
    if name == "negative_prompt":
        return pipe, {"negative_prompt": concept}
    if name == "sld":
        safe = StableDiffusionPipelineSafe(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            unet=pipe.unet,
            scheduler=pipe.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        safe.safety_concept = concept
        safe.set_progress_bar_config(disable=True)
        return safe, dict(SLD_PRESETS[sld_preset])
    raise ValueError(f"baselines: {name!r} is not a baseline; valid: {', '.join(BASELINES)}")
