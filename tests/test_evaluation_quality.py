"""Quality metrics against references computed by hand: the toy CLIP's cosines, the ImageReward port's own scores,
and the closed-form Fréchet distance of two feature sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from rl_safety.evaluation.metrics import MetricError, build_metric
from rl_safety.evaluation.quality import ClipScore, FrechetDistance, ImageRewardScore
from rl_safety.rewards.image_reward import ImageReward
from rl_safety.toyworld import ASSETS
from rl_safety.toyworld.clip import load_clip
from rl_safety.toyworld.data import make_dataset

from .test_image_reward import FIXTURE, image_tensor

PROMPTS = ["a red circle", "a blue square", "a green triangle", "something yellow"]


@pytest.fixture(scope="module")
def toy_images() -> torch.Tensor:
    return make_dataset(4, seed=3)["images"]


@pytest.fixture(scope="module")
def clip_metric() -> ClipScore:
    return ClipScore(model="toyworld", pretrained=None)


def test_clip_score_is_the_mean_clamped_cosine_times_100(clip_metric, toy_images):
    encoder = load_clip()
    with torch.no_grad():
        image = encoder.model.encode_image((toy_images - 0.5) / 0.5)  # the toy CLIP's normalisation, by hand
        text = encoder.model.encode_text(encoder.tokenizer(PROMPTS))
    cosine = torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1)
    expected = (100 * cosine.clamp(min=0)).mean().item()
    clip_metric.reset()
    clip_metric.update(toy_images, PROMPTS)
    result = clip_metric.compute()
    assert result == {"clip_score": pytest.approx(expected, rel=1e-5), "n": 4.0}
    assert clip_metric.protocol()["model"] == "toyworld"


def test_clip_score_accumulates_over_batches_and_resets(clip_metric, toy_images):
    clip_metric.reset()
    clip_metric.update(toy_images, PROMPTS)
    whole = clip_metric.compute()
    clip_metric.reset()
    clip_metric.update(toy_images[:1], PROMPTS[:1])
    clip_metric.update(toy_images[1:], PROMPTS[1:])
    assert clip_metric.compute() == {"clip_score": pytest.approx(whole["clip_score"], rel=1e-6), "n": 4.0}
    clip_metric.reset()
    clip_metric.update(toy_images[:2], PROMPTS[:2])
    assert clip_metric.compute()["n"] == 2.0
    with pytest.raises(ValueError, match="prompts"):
        clip_metric.update(toy_images, PROMPTS[:3])


@pytest.mark.parametrize("model", ["local-dir:{clip}", "{clip}"])
def test_clip_score_takes_a_local_folder(clip_metric, toy_images, model):
    metric = ClipScore(model=model.format(clip=ASSETS / "clip"), pretrained=None)
    metric.update(toy_images, PROMPTS)
    clip_metric.reset()
    clip_metric.update(toy_images, PROMPTS)
    assert metric.compute() == clip_metric.compute()
    json.dumps(metric.protocol())  # written into the report


def test_clip_score_bad_model_is_one_line():
    with pytest.raises(MetricError) as info:
        build_metric("clip_score", {"model": "no-such-clip", "pretrained": None})
    assert "clip_score: cannot load CLIP model='no-such-clip'" in str(info.value) and "\n" not in str(info.value)


def test_image_reward_score_is_the_mean_of_the_port_scores():
    args = {"checkpoint": str(FIXTURE), "tokenizer": str(FIXTURE), "vision_num_heads": 4}
    metric = build_metric("image_reward", args)
    port = ImageReward(**args)
    images = torch.cat([image_tensor(FIXTURE / "image_0.png"), image_tensor(FIXTURE / "image_0.png").flip(-1)])
    prompts = ["a photo of a cat", "a small house at night"]
    with torch.no_grad():
        expected = port(images, prompts)
    metric.update(images[:1], prompts[:1])
    metric.update(images[1:], prompts[1:])
    assert metric.compute() == {"image_reward": pytest.approx(expected.mean().item(), rel=1e-5), "n": 2.0}
    assert metric.protocol()["image_size"] == 224
    json.dumps(metric.protocol())


def test_image_reward_bad_checkpoint_is_one_line(tmp_path):
    with pytest.raises(MetricError) as info:
        ImageRewardScore(checkpoint=str(tmp_path / "missing.pt"))
    assert "image_reward: cannot load checkpoint=" in str(info.value) and "\n" not in str(info.value)


class Projection(torch.nn.Module):
    """A deterministic feature extractor: the mean colour of each 2x2 block, projected by a fixed matrix."""

    def __init__(self, size: int = 8, dim: int = 5):
        super().__init__()
        self.register_buffer(
            "weight", torch.randn(3 * (size // 2) ** 2, dim, generator=torch.Generator().manual_seed(0))
        )
        self.num_features = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(images, 2).flatten(1) @ self.weight


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½), with unbiased covariances."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def random_images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 8, 8, generator=generator) * 0.8 + shift).clamp(0, 1)


def test_fid_matches_the_closed_form_and_keeps_references_over_reset(tmp_path):
    reference, generated = random_images(40, 0), random_images(30, 1, shift=0.1)
    torch.save(reference, tmp_path / "reference.pt")
    extractor = Projection()
    metric = FrechetDistance(tmp_path / "reference.pt", feature=extractor, image_size=None, batch_size=16)
    for batch in generated.split(7):
        metric.update(batch, [""] * len(batch))
    with torch.no_grad():
        expected = frechet_distance(extractor(reference).double().numpy(), extractor(generated).double().numpy())
    result = metric.compute()
    assert result == {"fid": pytest.approx(expected, rel=1e-4), "n": 30.0, "n_reference": 40.0}
    metric.reset()
    metric.update(reference, [""] * 40)
    assert metric.compute()["fid"] == pytest.approx(0, abs=1e-6)
    assert metric.protocol()["feature_extractor"] == "Projection"
    json.dumps(metric.protocol())


def test_fid_reads_a_folder_of_images_and_resizes(tmp_path):
    reference = (random_images(6, 2) * 255).round().to(torch.uint8)
    for i, image in enumerate(reference):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    metric = FrechetDistance(tmp_path, feature=Projection(size=4), image_size=4, batch_size=4)
    metric.update(reference.float() / 255, [""] * 6)  # the same images: resized the same way, distance 0
    assert metric.compute() == {"fid": pytest.approx(0, abs=1e-6), "n": 6.0, "n_reference": 6.0}


def test_fid_resizes_reference_photos_of_any_size(tmp_path):
    for i, size in enumerate([(10, 12), (8, 8), (16, 9)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(tmp_path / f"{i}.jpg")
    metric = build_metric("fid", {"reference": str(tmp_path), "feature": "tests.test_evaluation_quality:Projection"})
    assert metric.image_size == 299 and metric.protocol()["feature_extractor"] == "Projection"
    metric = FrechetDistance(tmp_path, feature=Projection(), image_size=8)
    metric.update(random_images(4, 0), [""] * 4)
    assert metric.compute()["n_reference"] == 3.0
    with pytest.raises(MetricError, match="differ in size; set image_size"):
        FrechetDistance(tmp_path, feature=Projection(), image_size=None).update(random_images(2, 0), ["", ""])


def test_fid_feeds_each_process_its_share_of_the_references(tmp_path, monkeypatch):
    import rl_safety.evaluation.quality as quality

    torch.save((random_images(5, 0) * 255).to(torch.uint8), tmp_path / "reference.pt")
    monkeypatch.setattr(quality, "distributed_shard", lambda: (1, 2))
    metric = FrechetDistance(tmp_path / "reference.pt", feature=Projection(), image_size=None)
    metric.update(random_images(3, 1), [""] * 3)
    assert int(metric.fid.real_features_num_samples) == 2  # images 1 and 3 of 5; the other process feeds 0, 2, 4
    assert metric.compute()["n_reference"] == 5.0


@pytest.mark.parametrize(
    "args, expected",
    [
        ({"feature": 100}, "fid: feature=100 must be one of (64, 192, 768, 2048)"),
        ({"reference": "missing.pt"}, "is neither a folder of images nor a tensor file"),
        ({"reference": "list.pt"}, "holds list; expected one (N, 3, H, W) image tensor"),
        ({"feature": "torch.nn:Nope"}, "fid: feature='torch.nn:Nope': cannot build it"),
        ({"feature": "collections:OrderedDict"}, "built a OrderedDict, not a torch.nn.Module"),
    ],
)
def test_fid_bad_arguments_are_one_line(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(MetricError) as info:
        build_metric("fid", {"reference": str(tmp_path), "feature": Projection(), **args})
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_fid_inception_without_torch_fidelity_says_what_to_install(tmp_path, monkeypatch):
    import torchmetrics.image.fid

    monkeypatch.setattr(torchmetrics.image.fid, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(MetricError, match="pip install torch-fidelity") as info:
        FrechetDistance(tmp_path, feature=2048)
    assert "\n" not in str(info.value)


def test_fid_inception_weights_unreachable_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    import torchmetrics.image.fid

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchmetrics.image.fid, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", offline, raising=False)
    with pytest.raises(MetricError, match="cannot load the Inception weights .* pass weights_path=") as info:
        FrechetDistance(tmp_path, feature=2048)
    assert "\n" not in str(info.value)


def test_fid_needs_two_images_each(tmp_path):
    torch.save(random_images(1, 0), tmp_path / "one.pt")
    metric = FrechetDistance(tmp_path / "one.pt", feature=Projection(), image_size=None)
    metric.update(random_images(3, 1), [""] * 3)
    with pytest.raises(MetricError, match="at least 2 generated and 2 reference images; got 3 and 1"):
        metric.compute()
