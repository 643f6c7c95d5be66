"""Image quality and prompt alignment metrics: CLIP score, ImageReward and FID against reference images.

They answer the question an erasure benchmark asks beside the erasure rate: did the fine-tuned model keep making
good images of everything else (usually COCO captions, see `coco.py`)? Each one reuses a scorer the trainers already
use (the CLIP plumbing of `rewards/clip_models.py`, the ImageReward port) or a maintained library (torchmetrics' FID),
so a number here means what it means there and in the papers.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..errors import first_line
from .metrics import EvaluationMetric, MetricError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors")
INCEPTION_FEATURES = (64, 192, 768, 2048)  # the pool layers torchmetrics' Inception exposes


def library_versions(*names: str) -> dict[str, str | None]:
    """Installed versions of `names` (None when missing): they decide the numbers, so reports record them."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


class MeanScore(EvaluationMetric):
    """The mean of a per-image score over every image seen; the sum and count are synced across processes."""

    key = "score"

    def __init__(self) -> None:
        super().__init__()
        # float64 sums: 30k images of scores near 30 would lose digits in float32.
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts; expected one prompt per image")
        with torch.no_grad():
            scores = self.scores(images, list(prompts))
        self.total += scores.double().sum().to(self.total.device)
        self.count += len(scores)

    def compute(self) -> dict[str, float]:
        count = int(self.count)
        return {self.key: (self.total / count).item() if count else float("nan"), "n": float(count)}


class ClipScore(MeanScore):
    """Mean CLIPScore, 100 * max(cos(image, prompt), 0), as torchmetrics' `CLIPScore` defines it.

    `model`/`pretrained`/`checkpoint`/`precision` are `rewards.clip_models.load_open_clip`'s: an open_clip name and
    tag (the default is torchmetrics' CLIP, OpenAI's ViT-L/14), `local-dir:<folder>`, a folder in open_clip's
    format, or `toyworld`; `encoder` takes an already built `ClipEncoder` instead.
    """

    key = "clip_score"

    def __init__(
        self,
        model: str = "ViT-L-14",
        pretrained: str | None = "openai",
        checkpoint: str | None = None,
        precision: str = "fp32",
        encoder: Any = None,
    ):
        super().__init__()
        from rl_safety.rewards.clip_models import OpenClipEncoder

        if encoder is None:
            try:
                encoder = OpenClipEncoder.load(model, pretrained, checkpoint, precision)
            except (ValueError, OSError, RuntimeError) as err:
                raise MetricError(f"clip_score: cannot load CLIP model={model!r} ({first_line(err)})") from err
            self.source = {"model": model, "pretrained": pretrained, "checkpoint": checkpoint, "precision": precision}
        else:
            self.source = {"encoder": type(encoder).__name__}
        self.encoder = encoder

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from rl_safety.rewards.clip_models import clip_score

        return clip_score(self.encoder, images, prompts)

    def protocol(self) -> dict[str, Any]:
        preprocess = self.encoder.preprocess
        return {
            "metric": "ClipScore",
            "definition": "mean of 100 * max(cos(image embedding, prompt embedding), 0)",
            **self.source,
            "preprocess": {"size": preprocess.size, "resize_mode": preprocess.resize_mode, "mean": preprocess.mean},
            "versions": library_versions("torch", "open_clip_torch"),
        }


class ImageRewardScore(MeanScore):
    """Mean ImageReward score (Xu et al. 2023) through the project's port (`rewards/image_reward.py`), whose scores
    match the `image-reward` package; arguments are the port's (`checkpoint` a Hub repo, folder or file)."""

    key = "image_reward"

    def __init__(
        self,
        checkpoint: str = "THUDM/ImageReward",
        med_config: str | None = None,
        tokenizer: str = "bert-base-uncased",
        vision_num_heads: int | None = None,
    ):
        super().__init__()
        from rl_safety.rewards.image_reward import ImageReward

        try:
            self.model = ImageReward(checkpoint, med_config, tokenizer, vision_num_heads)
        except (ValueError, OSError) as err:
            raise MetricError(f"image_reward: cannot load checkpoint={checkpoint!r} ({first_line(err)})") from err
        self.source = {"checkpoint": str(checkpoint), "tokenizer": str(tokenizer)}

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        # The port's tensor path: differentiable resize and crop in torch (the training reward's own path).
        return self.model(images.to(self.model.device), prompts)

    def protocol(self) -> dict[str, Any]:
        return {
            "metric": "ImageRewardScore",
            "definition": "mean normalised ImageReward score, tensor preprocessing (antialiased bicubic resize)",
            **self.source,
            "image_size": self.model.image_size,
            "versions": library_versions("torch", "transformers"),
        }


def resize_square(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] squashed to size x size (antialiased bicubic, clamped) as torch-fidelity and clean-fid
    resize to Inception's input; `None` keeps the images as they are."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return TF.resize(images, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)


def reference_batches(
    source: str | Path, batch_size: int, image_size: int | None, shard: tuple[int, int] = (0, 1)
) -> tuple[int, Iterator[torch.Tensor]]:
    """The number of reference images and this process's share of them in batches of floats in [0, 1], each image
    squashed to `image_size` (see `resize_square`). `source`: a folder of image files (sorted by name) or a tensor
    file holding (N, 3, H, W) floats in [0, 1] or uint8; `shard` = (rank, world size) keeps every world-th image."""
    path = Path(source).expanduser()
    rank, world = shard
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return len(files), _image_file_batches(files[rank::world], batch_size, image_size, path)
    images = load_reference_tensor(path)
    return len(images), _tensor_batches(images[rank::world], batch_size, image_size)


def _image_file_batches(
    files: list[Path], batch_size: int, image_size: int | None, folder: Path
) -> Iterator[torch.Tensor]:
    from PIL import Image

    for start in range(0, len(files), batch_size):
        batch = []
        for file in files[start : start + batch_size]:
            pixels = np.asarray(Image.open(file).convert("RGB"), dtype=np.uint8).copy()
            # Resized one by one: reference photos (COCO's) come in many sizes.
            batch.append(resize_square(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, image_size))
        if len({tuple(image.shape) for image in batch}) > 1:
            raise MetricError(f"fid: reference images in {folder} differ in size; set image_size to resize them")
        yield torch.cat(batch)


def _tensor_batches(images: torch.Tensor, batch_size: int, image_size: int | None) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        yield resize_square(batch.float() / 255 if batch.dtype == torch.uint8 else batch.float(), image_size)


def load_reference_tensor(path: Path) -> torch.Tensor:
    """The (N, 3, H, W) image tensor of a `.pt`/`.safetensors` file (a safetensors file's single tensor)."""
    if not path.is_file() or path.suffix.lower() not in TENSOR_SUFFIXES:
        kinds = ", ".join(TENSOR_SUFFIXES)
        raise MetricError(f"fid: reference={str(path)!r} is neither a folder of images nor a tensor file ({kinds})")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            tensors = list(load_file(str(path)).values())
            images = tensors[0] if len(tensors) == 1 else None
        else:
            images = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise MetricError(f"fid: cannot read reference={str(path)!r} ({first_line(err)})") from err
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise MetricError(f"fid: reference={str(path)!r} holds {shape}; expected one (N, 3, H, W) image tensor")
    return images


def feature_extractor(path: str) -> torch.nn.Module:
    """The module built by the no-argument class or factory `package.module:attr` (a recipe cannot hold a module)."""
    module_name, _, attr = path.partition(":")
    try:
        extractor = getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        raise MetricError(f"fid: feature={path!r}: cannot build it ({first_line(err)})") from err
    if not isinstance(extractor, torch.nn.Module):
        raise MetricError(f"fid: feature={path!r} built a {type(extractor).__name__}, not a torch.nn.Module")
    return extractor


def distributed_shard() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, so each process feeds a disjoint share of the references."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class FrechetDistance(EvaluationMetric):
    """FID between the generated images and reference images, through torchmetrics' `FrechetInceptionDistance`.

    `reference`: a folder of image files or a tensor file, read once (in batches of `batch_size`, split across
    processes) and fed as the real set; it stays across `reset()`. `feature`: 64/192/768/2048 picks the standard
    Inception-v3 pool features (torch-fidelity's weights, downloaded once, or `weights_path`), or a `torch.nn.Module`
    mapping (B, 3, H, W) floats in [0, 1] to (B, D) features (in a recipe: `package.module:attr` of a class or
    factory that builds one with no arguments). `image_size`: every image is squashed to this square
    first (None: sizes must already agree).
    """

    def __init__(
        self,
        reference: str | Path,
        feature: int | str | torch.nn.Module = 2048,
        image_size: int | None = 299,
        batch_size: int = 50,
        weights_path: str | None = None,
    ):
        super().__init__()
        from torchmetrics.image.fid import FrechetInceptionDistance

        if isinstance(feature, str):
            feature = feature_extractor(feature)
        if isinstance(feature, int) and feature not in INCEPTION_FEATURES:
            raise MetricError(f"fid: feature={feature} must be one of {INCEPTION_FEATURES} or a torch.nn.Module")
        path = Path(reference).expanduser()
        if not path.is_dir():
            load_reference_tensor(path)  # a bad reference fails now, not after a whole generation run
        self.reference, self.image_size, self.batch_size = path, image_size, batch_size
        self.feature_name = (
            f"inception-v3-compat pool {feature}" if isinstance(feature, int) else type(feature).__name__
        )
        size = (3, image_size, image_size) if image_size else (3, 299, 299)
        try:
            # normalize=True: floats in [0, 1] in; torchmetrics quantises them to uint8 for Inception, as files are.
            self.fid = FrechetInceptionDistance(
                feature,
                reset_real_features=False,
                normalize=True,
                input_img_size=size,
                feature_extractor_weights_path=weights_path,
            )
        except ModuleNotFoundError as err:
            raise MetricError(
                "fid: the Inception features need torch-fidelity: pip install torch-fidelity (or torchmetrics[image])"
            ) from err
        except OSError as err:  # the weights download (github.com) or weights_path failed
            raise MetricError(
                f"fid: cannot load the Inception weights ({first_line(err)}); where downloads are blocked, pass "
                "weights_path=<torch-fidelity's weights-inception-2015-12-05-6726825d.pth>"
            ) from err
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")
        self.n_reference = 0
        self.references_fed = False

    def feed_references(self) -> None:
        """Feed this process's share of the reference images as the real set, once."""
        if self.references_fed:
            return
        device = self.fid.real_features_sum.device
        # No collective here: a process may first get here in update(), another in compute().
        self.n_reference, batches = reference_batches(
            self.reference, self.batch_size, self.image_size, distributed_shard()
        )
        for batch in batches:
            self.fid.update(batch.to(device), real=True)
        self.references_fed = True

    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        self.feed_references()
        images = images.to(self.fid.fake_features_sum.device)
        self.fid.update(resize_square(images.float(), self.image_size), real=False)
        self.count += len(images)

    def compute(self) -> dict[str, float]:
        self.feed_references()
        count = int(self.count)
        if count < 2 or self.n_reference < 2:
            raise MetricError(
                f"fid: needs at least 2 generated and 2 reference images; got {count} and {self.n_reference}"
            )
        return {"fid": float(self.fid.compute()), "n": float(count), "n_reference": float(self.n_reference)}

    def reset(self) -> None:
        super().reset()
        self.fid.reset()  # keeps the reference statistics (reset_real_features=False)

    def protocol(self) -> dict[str, Any]:
        return {
            "metric": "FrechetDistance",
            "feature_extractor": self.feature_name,
            "image_size": self.image_size,
            "resize": "antialiased bicubic squash, then uint8 for Inception",
            "reference": str(self.reference),
            "versions": library_versions("torch", "torchmetrics", "torch-fidelity"),
        }
