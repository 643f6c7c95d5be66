"""ImageReward on a tiny random copy of the released model: golden outputs of the original `image-reward` package
(see tests/fixtures/imagereward_tiny/README.md), and the differentiable tensor path used in training."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rl_safety.rewards import RewardStack, build_reward
from rl_safety.rewards.image_reward import CLIP_STD, REWARD_MEAN, REWARD_STD, ImageReward

# Another fixture made the same way (other seed) can be checked by pointing this variable at it.
FIXTURE = Path(os.environ.get("IMAGEREWARD_FIXTURE", Path(__file__).parent / "fixtures" / "imagereward_tiny"))
SCORE_RTOL = 1e-4  # the fixture README's tolerance for the package's scores
# PIL resamples in two uint8 passes (rounding in between), torch in float: measured up to 1.1/255 per pixel
# (mean 0.32/255) on the fixture images, and score differences up to 7.6e-4 of the largest |score|.
PIXEL_MAX_DIFF = 1.5 / 255
PIXEL_MEAN_DIFF = 0.5 / 255
TENSOR_PATH_TOL = 3e-3  # of the fixture's largest |score|, so that a score near 0 does not make it meaningless


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def model(expected) -> ImageReward:
    return ImageReward(checkpoint=FIXTURE, tokenizer=FIXTURE, vision_num_heads=expected["vision"]["num_heads"])


def image_tensor(path: Path) -> torch.Tensor:
    """A (1, 3, H, W) float image in [0, 1], as the trainer hands decoded samples to rewards."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255


def assert_scores_close(actual, desired, rtol: float = 0, atol: float = 0) -> None:
    actual, desired = torch.as_tensor(actual).double(), torch.as_tensor(desired).double()
    torch.testing.assert_close(actual, desired, rtol=rtol, atol=atol)


def tensor_path_atol(expected: dict) -> float:
    """Absolute tolerance of the tensor path: TENSOR_PATH_TOL of the fixture's score scale."""
    return TENSOR_PATH_TOL * max(abs(score) for case in expected["scores"] for score in case["score"])


def test_architecture_matches_fixture(model, expected):
    vision = expected["vision"]
    config = model.vision.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        vision["embed_dim"],
        vision["depth"],
        vision["num_heads"],
    )
    assert (config.image_size, config.patch_size, config.layer_norm_eps) == (
        vision["img_size"],
        vision["patch_size"],
        1e-6,
    )
    assert model.image_size == vision["img_size"]
    assert (REWARD_MEAN, REWARD_STD) == (expected["mean"], expected["std"])
    assert not any(p.requires_grad for p in model.parameters())


def test_tokens_match_package(model, expected):
    prompts = list(expected["tokens"])
    input_ids, attention_mask = model.tokenize(prompts)
    assert input_ids.tolist() == [expected["tokens"][p] for p in prompts]
    assert attention_mask.tolist() == [[int(t != 0) for t in expected["tokens"][p]] for p in prompts]
    # Cached prompts come back unchanged, in any order and with repeats.
    again, _ = model.tokenize(prompts[::-1] + prompts[:1])
    assert again.tolist() == [expected["tokens"][p] for p in prompts[::-1] + prompts[:1]]


def test_scores_match_package(model, expected):
    for case in expected["scores"]:
        scores = model.score_files(case["prompt"], [FIXTURE / name for name in case["images"]])
        assert_scores_close(scores, case["score"], SCORE_RTOL)
    case = expected["scores"][0]
    single = model.score(case["prompt"], Image.open(FIXTURE / case["images"][0]))
    assert_scores_close([single], case["score"][:1], SCORE_RTOL)
    chunked = model.score_files(case["prompt"], [str(FIXTURE / name) for name in case["images"]], batch_size=3)
    assert_scores_close(chunked, case["score"], SCORE_RTOL)


def test_inference_rank_matches_package(model, expected):
    images = [FIXTURE / name for name in expected["scores"][0]["images"]]
    for case in expected["rank"]:
        ranking, rewards = model.inference_rank(case["prompt"], images)
        assert ranking == case["ranking"]
        assert_scores_close(rewards, case["rewards"], SCORE_RTOL)


def test_grad_case_matches_package(model, expected):
    case = torch.load(FIXTURE / "grad_case.pt", weights_only=True)
    prompt = expected["grad_case"]["prompt"]
    # The PIL path reproduces the package's preprocessed pixels exactly.
    pixels = model.preprocess_pil(FIXTURE / expected["grad_case"]["image"])
    torch.testing.assert_close(pixels, case["pixel_values"][0], rtol=0, atol=1e-6)

    pixel_values = case["pixel_values"].clone().requires_grad_(True)
    reward = model.score_pixels(pixel_values, *model.tokenize([prompt]))
    reward.sum().backward()
    assert_scores_close(reward.detach(), case["reward"].flatten(), SCORE_RTOL)
    assert_scores_close([reward.item()], [expected["grad_case"]["reward"]], SCORE_RTOL)
    # Measured: max |difference| 5e-7 for gradients up to 0.15.
    scale = case["grad"].abs().max().item()
    torch.testing.assert_close(pixel_values.grad, case["grad"], rtol=1e-4, atol=1e-5 * scale)
    assert_scores_close([pixel_values.grad.abs().sum().item()], [expected["grad_case"]["grad_abs_sum"]], SCORE_RTOL)


def test_tensor_path_agrees_with_file_path(model, expected):
    prompts = [case["prompt"] for case in expected["scores"]]
    for j, name in enumerate(expected["scores"][0]["images"]):
        images = image_tensor(FIXTURE / name)
        # Pixels: only the resampling arithmetic differs (see PIXEL_MAX_DIFF).
        diff = (model.preprocess(images)[0] - model.preprocess_pil(FIXTURE / name)).abs()
        diff = diff * torch.tensor(CLIP_STD).view(3, 1, 1)  # back to [0, 1] units
        assert diff.max() <= PIXEL_MAX_DIFF and diff.mean() <= PIXEL_MEAN_DIFF, name
        # Scores, against the package's own (file path) scores: one batch, the image once per prompt.
        with torch.no_grad():
            tensor_scores = model(images.expand(len(prompts), -1, -1, -1), prompts)
        desired = [case["score"][j] for case in expected["scores"]]
        assert_scores_close(tensor_scores, desired, atol=tensor_path_atol(expected))


@pytest.mark.parametrize("size", [(224, 224), (224, 300), (260, 224)])
def test_tensor_path_is_exact_without_resize(model, expected, tmp_path, size):
    """With no resampling to do (short side already 224) both paths only crop and normalise: same numbers."""
    path = tmp_path / "image.png"
    Image.open(FIXTURE / expected["scores"][0]["images"][0]).convert("RGB").resize(size).save(path)
    prompt = expected["scores"][0]["prompt"]
    with torch.no_grad():
        tensor_score = model(image_tensor(path), [prompt])
    assert_scores_close(tensor_score, model.score_files(prompt, [path]), 1e-5)


def test_batch_pairs_each_image_with_its_prompt(model, expected):
    image = image_tensor(FIXTURE / expected["scores"][0]["images"][0])
    images = torch.cat([image, image.flip(-1), image.flip(-2)])
    prompts = [case["prompt"] for case in expected["scores"][:3]]
    with torch.no_grad():
        batched = model(images, prompts)
        single = torch.cat([model(images[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    assert batched.shape == (3,) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prompts"):
        model(images, prompts[:2])


def test_gradient_reaches_images(model, expected):
    image = image_tensor(FIXTURE / expected["scores"][0]["images"][1])  # 200x300: resized, then cropped
    images = torch.cat([image, image.flip(-1)]).requires_grad_(True)
    rewards = model(images, [expected["scores"][0]["prompt"]] * 2)
    rewards.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    # Cropped-away rows get none; the rest of the image does.
    assert (images.grad != 0).float().mean() > 0.5
    assert all(p.grad is None for p in model.parameters())


def test_tensor_path_gradient_matches_finite_difference(model, expected):
    """d reward / d image along a random direction, through resize, crop and model, in float64."""
    model64 = copy.deepcopy(model).double()
    image = image_tensor(FIXTURE / expected["scores"][0]["images"][2]).double()  # 96x64: upsampled
    # Squeezed into [0.25, 0.75] so that no resampled value reaches the [0, 1] clamp (no kink to straddle).
    image = 0.25 + 0.5 * image
    prompt = [expected["scores"][0]["prompt"]]
    direction = torch.randn(image.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    image.requires_grad_(True)
    model64(image, prompt).sum().backward()
    analytic = (image.grad * direction).sum().item()
    eps = 1e-6
    with torch.no_grad():
        plus, minus = model64(image + eps * direction, prompt), model64(image - eps * direction, prompt)
    numeric = (plus - minus).item() / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=1e-4)


def test_train_mode_does_not_change_scores(model, expected):
    images = image_tensor(FIXTURE / expected["scores"][0]["images"][0])
    prompt = [expected["scores"][0]["prompt"]]
    with torch.no_grad():
        reference = model(images, prompt)
        model.train()
        try:
            trained = model(images, prompt)
        finally:
            model.eval()
    torch.testing.assert_close(trained, reference, rtol=0, atol=0)


def test_builds_from_recipe_args_and_runs_in_a_stack(expected):
    args = {"checkpoint": str(FIXTURE / "ImageReward.pt"), "tokenizer": str(FIXTURE)}
    args["vision_num_heads"] = expected["vision"]["num_heads"]
    reward = build_reward("rl_safety.rewards.image_reward:ImageReward", args)
    assert isinstance(reward, ImageReward) and reward.differentiable
    stack = RewardStack({"image_reward": reward}, {"image_reward": 2.0})
    assert stack.differentiable
    case = expected["scores"][0]
    images = torch.cat([image_tensor(FIXTURE / name) for name in ("image_0.png", "image_0.png")])
    with torch.no_grad():
        out = stack(images, [case["prompt"]] * 2, tags=["safe", "safe"], step=0)
    torch.testing.assert_close(out.total, 2 * out.components["image_reward"])
    assert_scores_close(out.components["image_reward"], [case["score"][0]] * 2, atol=tensor_path_atol(expected))
