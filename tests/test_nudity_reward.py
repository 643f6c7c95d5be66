"""NudityPenalty: mode / threshold / class logic on a fake detector, BGR hand-off, the real NudeNet offline, errors.

No test image contains nudity: the scoring logic is checked on injected detections, and the real detector only on
synthetic images (plain colours, noise), where it must find nothing.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from rl_safety.rewards import RewardError, RewardStack
from rl_safety.rewards.nudity import (
    NUDENET_EXPOSED_CLASSES,
    NUDENET_LABELS,
    MissingDependencyError,
    NudityPenalty,
    to_bgr_uint8,
)


def det(name: str, score: float) -> dict:
    return {"class": name, "score": score, "box": [0, 0, 4, 4]}


# One list of detections per image of a batch of 5.
DETECTIONS = [
    [],  # nothing
    [det("FACE_FEMALE", 0.9), det("FEMALE_BREAST_COVERED", 0.95)],  # only classes outside the exposed set
    [det("BUTTOCKS_EXPOSED", 0.6), det("FEET_EXPOSED", 0.59)],  # at and below the threshold: strict >, so none
    [det("FEMALE_BREAST_EXPOSED", 0.7), det("FEMALE_BREAST_EXPOSED", 0.8), det("BELLY_EXPOSED", 0.65)],
    [det("MALE_GENITALIA_EXPOSED", 0.61), det("ARMPITS_EXPOSED", 0.3)],
]


class FakeDetector:
    """Returns fixed detections and records what it was handed."""

    def __init__(self, detections: list[list[dict]]):
        self.detections = detections
        self.calls: list[list[np.ndarray]] = []

    def __call__(self, images: list[np.ndarray]) -> list[list[dict]]:
        self.calls.append(images)
        return self.detections[: len(images)]


def batch(n: int = 5, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("mode", "threshold", "expected"),
    [
        ("any", 0.6, [0, 0, 0, -1, -1]),
        ("count", 0.6, [0, 0, 0, -2, -1]),  # two breasts are one class
        ("max_score", 0.6, [0, 0, 0, -0.8, -0.61]),
        ("any", 0.45, [0, 0, -1, -1, -1]),  # UnlearnDiffAtk's threshold
        ("count", 0.45, [0, 0, -2, -2, -1]),
        ("max_score", 0.0, [0, 0, -0.6, -0.8, -0.61]),
    ],
)
def test_modes_and_threshold(mode, threshold, expected):
    fake = FakeDetector(DETECTIONS)
    reward = NudityPenalty(mode=mode, threshold=threshold, detector=fake)
    assert not reward.differentiable
    value = reward(batch(), ["p"] * 5)
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float32))
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 5  # the whole rollout in one detector call


def test_custom_classes():
    reward = NudityPenalty(
        classes=["FEET_EXPOSED", "FACE_FEMALE"], mode="count", threshold=0.5, detector=FakeDetector(DETECTIONS)
    )
    torch.testing.assert_close(reward(batch(), ["p"] * 5), torch.tensor([0.0, -1.0, -1.0, 0.0, 0.0]))
    single = NudityPenalty(classes="BELLY_EXPOSED", detector=FakeDetector(DETECTIONS))
    torch.testing.assert_close(single(batch(), ["p"] * 5), torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0]))


def test_detector_gets_bgr_uint8_of_the_rgb_input():
    fake = FakeDetector([[]] * 2)
    images = batch(2, size=6)
    images[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # a pure red pixel
    NudityPenalty(detector=fake)(images, ["p", "q"])
    rgb = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for handed, expected in zip(fake.calls[0], rgb):
        assert handed.dtype == np.uint8 and handed.shape == (6, 6, 3) and handed.flags.c_contiguous
        np.testing.assert_array_equal(handed, expected[:, :, ::-1])
    np.testing.assert_array_equal(fake.calls[0][0][0, 0], [0, 0, 255])  # red comes last in BGR


def test_bad_args_and_bad_detector_output():
    fake = FakeDetector(DETECTIONS)
    with pytest.raises(RewardError, match="mode='all': expected one of any, count, max_score"):
        NudityPenalty(mode="all", detector=fake)
    with pytest.raises(
        RewardError, match=r"classes: unknown NudeNet class\(es\) \['BREAST_EXPOSED'\]; valid: .*FACE_MALE"
    ):
        NudityPenalty(classes=["BREAST_EXPOSED"], detector=fake)
    with pytest.raises(RewardError, match="classes: empty"):
        NudityPenalty(classes=[], detector=fake)
    with pytest.raises(RewardError, match="threshold=1.5"):
        NudityPenalty(threshold=1.5, detector=fake)
    with pytest.raises(RewardError, match="returned 5 results for 2 images"):
        NudityPenalty(detector=lambda images: DETECTIONS)(batch(2), ["p", "q"])


def test_missing_nudenet_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # makes `import nudenet` raise ImportError
    with pytest.raises(ImportError) as info:
        NudityPenalty()
    assert isinstance(info.value, MissingDependencyError)
    assert str(info.value) == 'the nudity reward needs NudeNet: pip install "rl_safety[nudenet]"'
    # From a recipe it is a RewardError, which the CLI turns into a one-line config error.
    with pytest.raises(RewardError, match=r'pip install "rl_safety\[nudenet\]"'):
        RewardStack.from_config([{"name": "rl_safety.rewards.nudity:NudityPenalty"}])


def test_labels_match_installed_nudenet():
    nudenet_module = pytest.importorskip("nudenet.nudenet")
    installed = getattr(nudenet_module, "__labels")  # module-level list, not exported
    assert tuple(installed) == NUDENET_LABELS
    assert len(NUDENET_EXPOSED_CLASSES) == 9
    assert set(NUDENET_EXPOSED_CLASSES) == {name for name in installed if name.endswith("_EXPOSED")}


@pytest.fixture(scope="module")
def real_reward() -> NudityPenalty:
    pytest.importorskip("nudenet")
    return NudityPenalty(mode="count", threshold=0.0, batch_size=4)


def synthetic_images() -> torch.Tensor:
    colours = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.8, 0.6, 0.5], [0.1, 0.3, 0.9]])
    plain = colours[:, :, None, None].expand(-1, -1, 64, 64)
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return torch.cat([plain, noise])


def test_real_nudenet_offline_finds_nothing_on_synthetic_images(real_reward, monkeypatch):
    session = real_reward.detector.model.onnx_session
    runs = []

    class CountingSession:
        def __getattr__(self, name):
            return getattr(session, name)

        def run(self, *args, **kwargs):
            runs.append(args[1]["images"].shape[0])
            return session.run(*args, **kwargs)

    monkeypatch.setattr(real_reward.detector.model, "onnx_session", CountingSession())
    images = synthetic_images()
    for mode in ("any", "count", "max_score"):
        reward = NudityPenalty(mode=mode, threshold=0.0, detector=real_reward.detector)  # threshold 0: strictest
        value = reward(images, ["p"] * len(images))
        assert value.shape == (7,) and value.dtype == torch.float32
        torch.testing.assert_close(value, torch.zeros(7))
    assert runs == [4, 3] * 3  # batched: one onnx call per batch_size images, not one per image


def test_real_nudenet_in_a_reward_stack_and_file_path_equivalence(real_reward, tmp_path):
    cv2 = pytest.importorskip("cv2")
    from nudenet.nudenet import _read_image
    from PIL import Image

    # The array this reward hands NudeNet gives the same network input as NudeNet reading the saved PNG itself.
    image = synthetic_images()[-1:]
    bgr = to_bgr_uint8(image)[0]
    Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])).save(tmp_path / "x.png")
    np.testing.assert_array_equal(_read_image(bgr)[0], _read_image(str(tmp_path / "x.png"))[0])
    assert cv2.imread(str(tmp_path / "x.png")).tolist() == bgr.tolist()

    stack = RewardStack({"nudity": real_reward}, {"nudity": 5.0})
    out = stack(synthetic_images(), ["p"] * 7)
    torch.testing.assert_close(out.total, torch.zeros(7))


def test_real_nudenet_options(tmp_path):
    nudenet = pytest.importorskip("nudenet")
    bundled = os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
    reward = NudityPenalty(model_path=bundled, providers=["CPUExecutionProvider"])
    assert reward.detector.model.onnx_session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(RewardError, match="model_path=.*no such file"):
        NudityPenalty(model_path=tmp_path / "640m.onnx")
