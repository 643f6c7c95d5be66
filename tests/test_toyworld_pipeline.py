"""The shipped toy-world pipeline loads with plain diffusers and draws what the prompt names."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from rl_safety.toyworld.classifier import colour_from_pixels, load_classifier
from rl_safety.toyworld.cli import ASSETS
from rl_safety.toyworld.data import COLOURS, SHAPES


@pytest.fixture(scope="module")
def pipeline():
    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "pipeline", safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_generates_the_prompted_colour_and_shape(pipeline):
    prompts = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    images = pipeline(
        prompts,
        num_inference_steps=20,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (24, 3, 32, 32)
    colour, _ = colour_from_pixels(images)
    shape = load_classifier(ASSETS / "judge_classifier")(images)["shape"].argmax(1)
    want_colour = torch.arange(len(COLOURS)).repeat_interleave(len(SHAPES))
    want_shape = torch.arange(len(SHAPES)).repeat(len(COLOURS))
    assert (colour == want_colour).float().mean() >= 0.9
    assert (shape == want_shape).float().mean() >= 0.9
