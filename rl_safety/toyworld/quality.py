"""How often the toy-world pipeline draws what the prompt names, judged independently of any training reward."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from . import ASSETS
from .classifier import colour_from_pixels, load_classifier
from .data import COLOURS, SHAPES


def load_toy_pipeline(path: str | Path = ASSETS / "pipeline") -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def prompt_accuracy(
    pipe: StableDiffusionPipeline, seeds: int = 10, steps: int = 20, guidance_scale: float = 4.0
) -> dict[str, float]:
    """Colour (exact pixel judge) and shape (judge classifier) accuracy on all 24 "a {colour} {shape}" × seeds."""
    judge = load_classifier(ASSETS / "judge_classifier")
    prompts = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    want_colour = torch.arange(len(COLOURS)).repeat_interleave(len(SHAPES))
    want_shape = torch.arange(len(SHAPES)).repeat(len(COLOURS))
    colour_ok, shape_ok = [], []
    for seed in range(seeds):
        images = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).images
        colour_ok.append(colour_from_pixels(images)[0] == want_colour)
        shape_ok.append(judge(images)["shape"].argmax(1) == want_shape)
    colour, shape = torch.cat(colour_ok).float(), torch.cat(shape_ok).float()
    return {
        "images": len(colour),
        "colour_accuracy": colour.mean().item(),
        "shape_accuracy": shape.mean().item(),
        "both_accuracy": (colour * shape).mean().item(),
    }
