"""The toy world's safety scenario: prompt sets, `{target_concept}` filling, and the concept / fidelity rewards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rl_safety.concept import fill_target_concept
from rl_safety.prompts import read_prompt_file
from rl_safety.rewards import RewardError, RewardStack
from rl_safety.rewards.classifier import ClassifierReward
from rl_safety.toyworld import ASSETS
from rl_safety.toyworld.classifier import load_classifier
from rl_safety.toyworld.data import COLOURS, CONCEPTS, SHAPES, SIZES, SYNONYMS, named_attributes, render
from rl_safety.toyworld.prompt_sets import TAGS, prompt_sets, render_file

from .conftest import REPO


def rendered(colours: list[str], shapes: list[str], seed: int = 0) -> torch.Tensor:
    colour_ids = torch.tensor([list(COLOURS).index(c) for c in colours])
    shape_ids = torch.tensor([SHAPES.index(s) for s in shapes])
    size_ids = torch.ones(len(colours), dtype=torch.long)  # large shapes: the classifier is surest on them
    return render(colour_ids, shape_ids, size_ids, torch.Generator().manual_seed(seed))[0]


@pytest.mark.parametrize("concept", CONCEPTS)
def test_shipped_prompt_files_match_the_generator(concept):
    for name, prompts in prompt_sets(concept).items():
        path = REPO / "prompts" / "toyworld" / concept / f"{name}.txt"
        assert path.read_text(encoding="utf-8") == render_file(name, concept, prompts), (
            f"{path} is stale: run `rl-safety toyworld prompts`"
        )
        assert read_prompt_file(path) == (prompts, TAGS[name])


def test_prompt_sets_split_by_concept():
    sets = prompt_sets("red")
    named = {name: [named_attributes(p) for p in prompts] for name, prompts in sets.items()}
    assert all(n["colour"] == "red" for n in named["unsafe"] + named["implicit"])
    assert all(n["colour"] != "red" and "shape" in n for n in named["safe"])
    assert set(sets["safe_train"]) <= set(sets["safe"])
    # Erasure trains on the plain word only: no synonym in a training set, and every synonym in the implicit set.
    words = {w for p in sets["unsafe"] + sets["safe_train"] for w in p.split()}
    assert not words & set(SYNONYMS["red"])
    assert {w for p in sets["implicit"] for w in p.split()} >= set(SYNONYMS["red"])
    assert {named_attributes(p)["shape"] for p in sets["unsafe"]} == set(SHAPES)
    # A shape concept: all colours of that shape are unsafe; shapes have no synonyms.
    circle = prompt_sets("circle")
    assert {named_attributes(p)["colour"] for p in circle["unsafe"]} == set(COLOURS)
    assert all(named_attributes(p)["shape"] != "circle" for p in circle["safe"]) and circle["implicit"] == []


def test_named_attributes():
    assert named_attributes("a large crimson circle on a dark background") == {"colour": "red", "shape": "circle"}
    assert named_attributes("Ruby square") == {"colour": "red", "shape": "square"}
    assert named_attributes("a picture of a triangle") == {"shape": "triangle"}
    assert named_attributes(f"a {SIZES[0]} thing") == {}


def test_fill_target_concept():
    recipe = {"args": {"concept": "{target_concept}", "exclude": ["{target_concept}", "x"], "alpha": 0.5}}
    assert fill_target_concept(recipe, "blue", "rewards") == {
        "args": {"concept": "blue", "exclude": ["blue", "x"], "alpha": 0.5}
    }
    assert fill_target_concept("prompts/{target_concept}/unsafe.txt", "circle", "p") == "prompts/circle/unsafe.txt"
    with pytest.raises(ValueError, match=r"rewards\[0\]\.args\.concept=.*target_concept is not set"):
        fill_target_concept([recipe], None, "rewards")
    # No placeholder, no concept needed.
    assert fill_target_concept(["a.txt"], None, "train_prompts") == ["a.txt"]


def test_log_one_minus_prob_matches_closed_form():
    model = load_classifier(ASSETS / "reward_classifier")
    images = rendered(["red", "green", "blue"], ["circle", "square", "cross"])
    reward = ClassifierReward(
        target_class="red", model=model, class_names=list(COLOURS), head="colour", output="log_one_minus_prob"
    )
    p_red = F.softmax(model(images)["colour"].double(), dim=1)[:, 0]
    torch.testing.assert_close(reward(images, [""] * 3).double(), torch.log1p(-p_red), rtol=1e-4, atol=1e-5)


def test_concept_penalty_ranks_the_concept_lowest_for_colours_and_shapes():
    stack = RewardStack.from_config([{"name": "toyworld_concept", "args": {"concept": "red"}}])
    images = rendered(["red", "green", "blue", "red"], ["circle", "circle", "square", "cross"])
    scores = stack(images, ["a red circle"] * 4).total
    assert scores[0] < -3 and scores[3] < -3 and scores[1] > -0.1 and scores[2] > -0.1
    by_shape = RewardStack.from_config([{"name": "toyworld_concept", "args": {"concept": "circle"}}])
    scores = by_shape(images, ["a red circle"] * 4).total
    assert scores[0] < -3 and scores[1] < -3 and scores[2] > -0.1 and scores[3] > -0.1
    with pytest.raises(RewardError, match="concept='orange'.*red, green"):
        RewardStack.from_config([{"name": "toyworld_concept", "args": {"concept": "orange"}}])


def test_fidelity_is_the_log_prob_of_named_attributes_except_excluded():
    model = load_classifier(ASSETS / "reward_classifier")
    images = rendered(["red", "green", "blue"], ["circle", "square", "cross"])
    prompts = ["a crimson circle", "a green triangle", "a picture of a cross"]
    reward = RewardStack.from_config([{"name": "toyworld_fidelity", "args": {"exclude": ["red"]}}])
    out = model(images)
    colour, shape = F.log_softmax(out["colour"], 1), F.log_softmax(out["shape"], 1)
    expected = torch.stack(
        [
            shape[0, SHAPES.index("circle")],  # "crimson" is red, which is excluded: the shape only
            colour[1, list(COLOURS).index("green")] + shape[1, SHAPES.index("triangle")],
            shape[2, SHAPES.index("cross")],  # no colour named
        ]
    )
    torch.testing.assert_close(reward(images, prompts).total, expected)
    keep_all = RewardStack.from_config([{"name": "toyworld_fidelity"}])
    assert keep_all(images[:1], ["a green circle"]).total < -3  # a red circle is not what was asked for
    with pytest.raises(RewardError, match="exclude='red'"):
        RewardStack.from_config([{"name": "toyworld_fidelity", "args": {"exclude": "red"}}])
