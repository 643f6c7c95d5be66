"""How often the toy-world pipeline draws what the prompt names, judged independently of any training reward.

`attributes_right` and `judge_attributes` are shared by `rl-safety toyworld quality` and `rl-safety eval`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from ..evaluation.generate import generate
from ..pipelines import pipeline_folder_problem
from . import ASSETS
from .classifier import colour_from_pixels, load_classifier
from .data import COLOURS, LABELS, SHAPES, named_attributes


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """diffusers' and transformers' loading bars off for the block: a folder that fails to load is then reported
    in one line, not after half a bar."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library in libraries:
            library.enable_progress_bar()


def load_toy_pipeline(path: str | Path = ASSETS / "pipeline") -> StableDiffusionPipeline:
    """A pipeline folder with the DDIM scheduler and no progress bars."""
    problem = pipeline_folder_problem(path)
    if problem:
        raise OSError(problem)
    with no_loading_bars():
        pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
@torch.no_grad()
def judge_attributes(images: torch.Tensor, judge: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Colour (exact, from pixels; −1 when nothing is coloured) and shape (the judge classifier) per image."""
    return {"colour": colour_from_pixels(images)[0], "shape": judge(images)["shape"].argmax(1)}


def attributes_right(judged: dict[str, torch.Tensor], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour right, shape right) per image; an attribute the prompt does not name counts as right."""
    wanted = [named_attributes(p) for p in prompts]
    want = {head: torch.tensor([LABELS[head].index(w[head]) if head in w else -1 for w in wanted]) for head in LABELS}
    return tuple((judged[head] == want[head]) | (want[head] < 0) for head in ("colour", "shape"))


def prompt_accuracy(
    pipe: StableDiffusionPipeline, seeds: int = 10, steps: int = 20, guidance_scale: float = 4.0
) -> dict[str, float]:
    """Colour (exact pixel judge) and shape (judge classifier) accuracy on all 24 "a {colour} {shape}" × seeds."""
    prompts = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    images = generate(pipe, prompts, range(seeds), steps, guidance_scale)
    judged = judge_attributes(images, load_classifier(ASSETS / "judge_classifier"))
    colour, shape = (ok.float() for ok in attributes_right(judged, prompts * seeds))
    return {
        "images": len(colour),
        "colour_accuracy": colour.mean().item(),
        "shape_accuracy": shape.mean().item(),
        "both_accuracy": (colour * shape).mean().item(),
    }
