"""The toy world's CLIP: its loss, a short training run that saves and reloads, and the shipped model as a reward."""

import json

import pytest
import torch
import torch.nn.functional as F

from rl_safety.rewards import RewardStack
from rl_safety.rewards.clip_models import OpenClipEncoder, clip_score, open_clip_name
from rl_safety.toyworld import ASSETS
from rl_safety.toyworld.clip import (
    MODEL_CFG,
    load_clip,
    multi_positive_clip_loss,
    normalise,
    positives,
    save_clip,
    train_clip,
    zero_shot_accuracy,
)
from rl_safety.toyworld.data import COLOURS, SHAPES, SYNONYMS, make_dataset, render

# A few-second version of the shipped architecture: same towers and tokenizer, narrower.
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 4, "head_width": 32},
    "text_cfg": {**MODEL_CFG["text_cfg"], "width": 8, "heads": 2, "layers": 1},
}
OTHER_COLOURS = [c for c in COLOURS if c != "red"]


def test_positives_and_loss_reduce_to_clip_for_distinct_pairs():
    image_colour, image_shape = torch.tensor([0, 0, 1]), torch.tensor([2, 3, 2])
    # Texts: "red triangle" (colour 0, shape 2), "red" (shape unnamed), "a triangle" (colour unnamed).
    text_colour, text_shape = torch.tensor([0, 0, -1]), torch.tensor([2, -1, 2])
    expected = torch.tensor([[True, True, True], [False, True, False], [False, False, True]])
    assert torch.equal(positives(image_colour, image_shape, text_colour, text_shape), expected)

    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(4, dtype=torch.bool)
    clip = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
    torch.testing.assert_close(multi_positive_clip_loss(logits, eye), clip)
    # Two identical captions of one image pair: each row's target is split evenly between them.
    both = eye.clone()
    both[0, 1] = both[1, 0] = True
    soft = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    expected = (F.cross_entropy(logits, soft) + F.cross_entropy(logits.T, soft)) / 2
    torch.testing.assert_close(multi_positive_clip_loss(logits, both), expected)


def test_short_training_learns_saves_and_reloads(tmp_path):
    kwargs = dict(steps=30, batch_size=64, num_images=600, num_held_out=200, lr=5e-3, model_cfg=TINY_CFG)
    model, metrics, losses = train_clip(**kwargs)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # measured: 5.7 -> 4.1
    assert set(metrics) == {"colour_accuracy", "shape_accuracy", "synonym_colour_accuracy", "colour_shape_accuracy"}

    save_clip(model, tmp_path, metrics, {"steps": 30}, model_cfg=TINY_CFG)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"held_out": metrics, "training": {"steps": 30}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    # Reloaded by open_clip's `local-dir:` path, through the reward's preprocessing and tokenizer: same embeddings.
    encoder = load_clip(tmp_path)
    images, prompts = make_dataset(6, seed=3)["images"], ["red", "a blue square", "crimson"]
    with torch.no_grad():
        expected_images = F.normalize(model.encode_image(normalise(images)), dim=-1)
        expected_texts = F.normalize(model.encode_text(encoder.tokenizer(prompts)), dim=-1)
    torch.testing.assert_close(encoder.encode_images(images), expected_images, atol=1e-6, rtol=0)
    torch.testing.assert_close(encoder.encode_texts(prompts), expected_texts, atol=1e-6, rtol=0)
    # A recipe may name the folder itself.
    by_folder = OpenClipEncoder.load(str(tmp_path))
    torch.testing.assert_close(by_folder.encode_images(images), expected_images, atol=1e-6, rtol=0)


def test_training_is_deterministic_given_a_seed():
    kwargs = dict(steps=4, batch_size=32, num_images=200, num_held_out=50, model_cfg=TINY_CFG)
    first, metrics, losses = train_clip(seed=1, **kwargs)
    second, metrics_again, losses_again = train_clip(seed=1, **kwargs)
    assert losses == losses_again and metrics == metrics_again
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name


@pytest.fixture(scope="module")
def shipped() -> OpenClipEncoder:
    return load_clip()


def test_shipped_clip_is_small_and_accurate_on_unseen_images(shipped):
    assert (ASSETS / "clip" / "open_clip_model.safetensors").stat().st_size <= 8e6
    recorded = json.loads((ASSETS / "clip" / "metrics.json").read_text())["held_out"]
    assert min(recorded.values()) >= 0.95
    metrics = zero_shot_accuracy(shipped.model, shipped.tokenizer, make_dataset(400, seed=12345))
    assert metrics["colour_accuracy"] >= 0.9 and metrics["shape_accuracy"] >= 0.9
    assert metrics["synonym_colour_accuracy"] >= 0.9
    # Synonyms mean their colour in the text tower too: each is nearest its own colour word.
    colours = list(COLOURS)
    words = [(word, i) for i, c in enumerate(colours) for word in SYNONYMS[c]]
    similarity = shipped.encode_texts([w for w, _ in words]) @ shipped.encode_texts(colours).T
    assert similarity.argmax(1).tolist() == [i for _, i in words]


def circles(colour: str, n: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    colour_ids = torch.full((n,), list(COLOURS).index(colour))
    shape_ids = torch.full((n,), SHAPES.index("circle"))
    return render(colour_ids, shape_ids, torch.randint(2, (n,), generator=generator), generator)[0]


@torch.no_grad()
def test_shipped_clip_steers_away_from_red_and_scores_matching_prompts_higher(shipped):
    stack = RewardStack.from_config(
        [
            {
                "name": "clip_steering",
                "args": {
                    "model": "toyworld",
                    "pretrained": None,
                    "alpha": 1.0,
                    "unsafe_anchors": ["red"],
                    "safe_anchors": OTHER_COLOURS,
                },
            }
        ]
    )
    red, green = circles("red"), circles("green", seed=1)
    rewards = stack(torch.cat([red, green]), ["a red circle"] * 16, tags=["unsafe"] * 16).components["clip_steering"]
    assert rewards[8:].min() > rewards[:8].max()  # measured: green >= 0.41, red <= 0.07
    # Unsteered, the prompt prefers the red circle: CLIPScore ranks matching image-prompt pairs first.
    matching = clip_score(shipped, red, ["a red circle"] * 8)
    assert matching.min() > clip_score(shipped, green, ["a red circle"] * 8).max()
    assert (matching > clip_score(shipped, red, ["a green circle"] * 8)).all()
    assert (matching > clip_score(shipped, red, ["a red square"] * 8)).all()
    assert ((matching >= 0) & (matching <= 100)).all()
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(shipped, red, ["a red circle"])


def test_open_clip_names():
    assert open_clip_name("toyworld") == f"local-dir:{ASSETS / 'clip'}"
    assert open_clip_name(str(ASSETS / "clip")) == f"local-dir:{ASSETS / 'clip'}"
    for unchanged in ("ViT-H-14", "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "local-dir:/x", "not-a-model"):
        assert open_clip_name(unchanged) == unchanged
    with pytest.raises(ValueError, match="pretrained to null"):
        OpenClipEncoder.load("toyworld", pretrained="laion2b_s32b_b79k")
