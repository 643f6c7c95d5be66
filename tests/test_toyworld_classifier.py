import json

import pytest
import torch

from rl_safety.rewards import build_reward
from rl_safety.toyworld import ASSETS
from rl_safety.toyworld.classifier import (
    colour_from_pixels,
    evaluate,
    load_classifier,
    save_classifier,
    train_classifier,
)
from rl_safety.toyworld.data import COLOURS, make_dataset


def test_rule_based_colour_judge_is_exact_on_real_images():
    data = make_dataset(300, seed=7)
    index, share = colour_from_pixels(data["images"])
    assert torch.equal(index, data["colour"])
    assert (share > 0).all()
    grey = torch.full((2, 3, 32, 32), 0.5)
    assert colour_from_pixels(grey)[0].tolist() == [-1, -1]


def test_classifier_learns_saves_and_serves_as_a_reward(tmp_path):
    model, metrics = train_classifier(steps=60, batch_size=64, num_images=1000, width=8, seed=0, num_held_out=300)
    assert metrics["colour_accuracy"] > 0.6  # chance is 1/6; the shipped model reaches ~1.0 with 600 steps
    save_classifier(model, tmp_path, metrics)
    assert json.loads((tmp_path / "config.json").read_text())["held_out"] == metrics
    reloaded = load_classifier(tmp_path)
    images = make_dataset(8, seed=3)["images"]
    torch.testing.assert_close(reloaded(images)["colour"], model(images)["colour"])

    config = json.loads((tmp_path / "config.json").read_text())
    reward = build_reward(
        "classifier",
        {
            "checkpoint": str(tmp_path / "model.safetensors"),
            "architecture": config["architecture"],
            "architecture_args": config["architecture_args"],
            "head": "colour",
            "class_names": list(COLOURS),
            "target_class": "red",
            "negate": True,
        },
    )
    expected = -torch.log_softmax(model(images)["colour"], dim=1)[:, list(COLOURS).index("red")]
    torch.testing.assert_close(reward(images, [""] * 8), expected)


@pytest.mark.parametrize("role", ["reward", "judge"])
def test_shipped_classifiers_are_accurate_on_unseen_images(role):
    model = load_classifier(ASSETS / f"{role}_classifier")
    metrics = evaluate(model, make_dataset(400, seed=12345))
    assert metrics["colour_accuracy"] >= 0.98 and metrics["shape_accuracy"] >= 0.98
