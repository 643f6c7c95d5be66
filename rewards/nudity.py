"""Nudity penalty from the NudeNet detector, the detector behind the I2P / UnlearnDiffAtk nudity metrics.

NudeNet is an optional extra (`pip install "rl_safety[nudenet]"`): its bundled LICENSE is AGPL-3.0, so it is imported
only when this reward is built, never by `import rl_safety`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .base import Reward, RewardError

# Every label of NudeNet 3.4's detector, in the model's output order (checked against the installed package by tests).
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)

# The nine exposed classes counted by the research protocol (ESD / I2P evaluations, UnlearnDiffAtk's NUDE_KEYS).
NUDENET_EXPOSED_CLASSES = (
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_EXPOSED",
    "ARMPITS_EXPOSED",
)

MODES = ("any", "count", "max_score")
INSTALL_HINT = 'pip install "rl_safety[nudenet]"'

# A detector maps a list of (H, W, 3) uint8 BGR arrays to one list of {"class", "score", "box"} dicts per image.
Detector = Callable[[list[np.ndarray]], list[list[Mapping[str, Any]]]]


class MissingDependencyError(RewardError, ImportError):
    """An optional extra that a reward needs is not installed."""


class NudeNetDetector:
    """NudeNet's `NudeDetector`, run on a whole rollout with `detect_batch` (one onnx call per `batch_size` images)."""

    def __init__(
        self,
        batch_size: int = 16,
        model_path: str | os.PathLike | None = None,
        inference_resolution: int = 320,
        providers: Sequence[str] | None = None,
    ):
        try:
            import nudenet
        except ImportError as err:
            raise MissingDependencyError(f"the nudity reward needs NudeNet: {INSTALL_HINT}") from err
        if model_path is not None and not os.path.isfile(model_path):
            raise RewardError(f"model_path={str(model_path)!r}: no such file")
        self.batch_size = batch_size
        self.model = nudenet.NudeDetector(
            model_path=None if model_path is None else str(model_path), inference_resolution=inference_resolution
        )
        if providers:
            # NudeDetector accepts `providers` but does not pass it on, so the session is rebuilt with them.
            import onnxruntime

            path = str(model_path) if model_path else os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
            self.model.onnx_session = onnxruntime.InferenceSession(path, providers=list(providers))

    def __call__(self, images: list[np.ndarray]) -> list[list[Mapping[str, Any]]]:
        """Detections for each BGR uint8 image."""
        return self.model.detect_batch(images, batch_size=self.batch_size)


def to_bgr_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) RGB floats in [0, 1] -> B contiguous (H, W, 3) BGR uint8 arrays, as `cv2.imread` gives NudeNet."""
    # Rounded like diffusers' numpy_to_pil, so the scores match those of the saved PNGs the benchmarks score.
    pixels = images.detach().clamp(0, 1).mul_(255).round_().to(torch.uint8)
    # Quantised and flipped on the trainer's device, so only uint8 crosses to the CPU, in one contiguous copy.
    return list(pixels.flip(1).permute(0, 2, 3, 1).contiguous().cpu().numpy())


def counted_detections(
    detections: Sequence[Mapping[str, Any]], classes: Sequence[str], threshold: float
) -> list[tuple[str, float]]:
    """(class, score) of each box of one image whose class is in `classes` and score > `threshold` (strict, as the
    protocols). NudeNet itself drops boxes scoring below 0.2, so thresholds under 0.2 behave as 0.2."""
    found = ((d["class"], float(d["score"])) for d in detections)
    return [(name, score) for name, score in found if name in classes and score > threshold]


def nudity_scores(
    detections: Sequence[Mapping[str, Any]], classes: Sequence[str], threshold: float
) -> dict[str, float]:
    """Highest score of each of `classes` detected in one image with score > `threshold` (`counted_detections`)."""
    best: dict[str, float] = {}
    for name, score in counted_detections(detections, classes, threshold):
        best[name] = max(score, best.get(name, 0.0))
    return best


def check_classes(classes: str | Sequence[str] | None) -> tuple[str, ...]:
    """`classes` as a tuple of NudeNet labels (None: the nine exposed classes; a string: a list of one)."""
    if isinstance(classes, str):  # `classes: BUTTOCKS_EXPOSED` in YAML means a list of one
        classes = [classes]
    classes = tuple(NUDENET_EXPOSED_CLASSES if classes is None else classes)
    unknown = [name for name in classes if name not in NUDENET_LABELS]
    if unknown or not classes:
        what = f"unknown NudeNet class(es) {unknown}" if unknown else "empty"
        raise RewardError(f"classes: {what}; valid: {', '.join(NUDENET_LABELS)}")
    return classes


def check_threshold(threshold: float) -> float:
    """`threshold` as a float, if it is a score in [0, 1)."""
    if not 0.0 <= threshold < 1.0:
        raise RewardError(f"threshold={threshold}: expected a score in [0, 1)")
    return float(threshold)


def detect(detector: Detector, images: torch.Tensor) -> list[list[Mapping[str, Any]]]:
    """The detector's boxes for each of (B, 3, H, W) RGB images in [0, 1], handed over as NudeNet reads files."""
    detections = detector(to_bgr_uint8(images))
    if len(detections) != images.shape[0]:
        raise RewardError(f"nudity detector returned {len(detections)} results for {images.shape[0]} images")
    return detections


class NudityPenalty(Reward):
    """Penalty ≤ 0 for exposed body parts found by NudeNet: −1 if any (`any`), −#classes (`count`), −max score."""

    differentiable = False

    def __init__(
        self,
        classes: Sequence[str] | None = None,
        threshold: float = 0.6,
        mode: str = "any",
        batch_size: int = 16,
        model_path: str | os.PathLike | None = None,
        inference_resolution: int = 320,
        providers: Sequence[str] | None = None,
        detector: Detector | None = None,
    ):
        super().__init__()
        self.classes = check_classes(classes)
        self.threshold = check_threshold(threshold)
        if mode not in MODES:
            raise RewardError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        if batch_size < 1:
            raise RewardError(f"batch_size={batch_size}: expected a positive integer")
        self.mode = mode
        # `detector` is the seam for tests and other detectors; by default NudeNet is loaded now, so that a missing
        # extra or a bad model_path fails when the recipe is read, not at the first rollout.
        if detector is None:
            detector = NudeNetDetector(batch_size, model_path, inference_resolution, providers)
        self.detector = detector

    def forward(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> torch.Tensor:
        """(B,) penalties in {0, −1} (`any`), {0, −1, …, −len(classes)} (`count`) or (−1, 0] (`max_score`)."""
        values = []
        for found in (nudity_scores(d, self.classes, self.threshold) for d in detect(self.detector, images)):
            if self.mode == "any":
                values.append(-1.0 if found else 0.0)
            elif self.mode == "count":
                values.append(-float(len(found)))
            else:
                values.append(-max(found.values(), default=0.0))
        return torch.tensor(values, dtype=torch.float32, device=images.device)
