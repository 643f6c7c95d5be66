"""The shipped toy-world pipeline loads with plain diffusers and draws what the prompt names."""

from rl_safety.toyworld.quality import load_toy_pipeline, prompt_accuracy


def test_generates_the_prompted_colour_and_shape():
    result = prompt_accuracy(load_toy_pipeline(), seeds=1)
    assert result["images"] == 24
    assert result["colour_accuracy"] >= 0.9 and result["shape_accuracy"] >= 0.9
