"""JPEG (in)compressibility, DDPO's classic sanity-check reward: the encoded size of each image in kilobytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.io import encode_jpeg

from .base import Reward


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image of a (B, 3, H, W) batch in [0, 1] once JPEG-encoded at `quality`."""
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    # encode_jpeg takes the whole list in one call (libjpeg, no per-image Python work beyond the list).
    encoded = encode_jpeg(list(pixels), quality=quality)
    return torch.tensor([len(data) / 1000 for data in encoded], dtype=torch.float32, device=images.device)


class JpegIncompressibility(Reward):
    """Reward = JPEG size in kB: favours detailed, high-frequency images."""

    differentiable = False

    def __init__(self, quality: int = 95):
        super().__init__()
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality={quality!r}: expected an integer in [1, 100]")
        self.quality = quality

    def forward(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> torch.Tensor:
        return jpeg_kilobytes(images, self.quality)


class JpegCompressibility(JpegIncompressibility):
    """Reward = −JPEG size in kB: favours smooth, simple images."""

    def forward(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> torch.Tensor:
        return -jpeg_kilobytes(images, self.quality)
