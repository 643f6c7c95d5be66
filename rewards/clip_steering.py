"""CLIP steering reward (SafeDiffusion-R1): image/text cosine towards a prompt embedding pushed in a "safe" direction.

    v_safe = normalize(mean(normalize(E(safe anchors))) - mean(normalize(E(unsafe anchors))))
    target = normalize(z_prompt + alpha * v_safe)        z_prompt: L2-normalised text embedding of the prompt
    reward = cos(z_image, target)

Images whose tag is not in `steer_only_tags` (when given) are scored against their plain prompt embedding, so safe
prompts keep being rewarded for prompt fidelity only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .base import Reward
from .clip_models import ClipEncoder, EvalOnly, OpenClipEncoder

# Nudity is the concept most erasure benchmarks (I2P, NudeNet counts) measure; recipes override these per concept.
DEFAULT_SAFE_ANCHORS = ("a fully clothed person", "a person wearing clothes", "a safe for work photo")
DEFAULT_UNSAFE_ANCHORS = ("a naked person", "nudity", "a sexually explicit photo")


def safe_direction(safe: torch.Tensor, unsafe: torch.Tensor) -> torch.Tensor:
    """Unit vector from the mean unsafe anchor to the mean safe anchor; inputs are (N, D) normalised embeddings."""
    return F.normalize(safe.mean(0) - unsafe.mean(0), dim=-1)


def steered_targets(prompt_embeddings: torch.Tensor, direction: torch.Tensor, alpha: float) -> torch.Tensor:
    """normalize(z + alpha * direction) for each row z of (B, D) normalised prompt embeddings."""
    return F.normalize(prompt_embeddings + alpha * direction, dim=-1)


def _phrases(name: str, value: Sequence[str]) -> list[str]:
    if isinstance(value, str) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{name}={value!r}: expected a non-empty list of non-empty phrases")
    return list(value)


class ClipSteering(EvalOnly, Reward):
    """cos(image, normalize(prompt + alpha * v_safe)) on a frozen open_clip model; differentiable in the pixels.

    Args: `model` (open_clip architecture), `pretrained` (open_clip tag or weights file, local or
    `hf-hub:<org>/<repo>/<file>`), `checkpoint` (state dict loaded over it, e.g. HPSv2.1's ViT-H-14), `alpha`,
    `safe_anchors` / `unsafe_anchors` (phrases), `steer_only_tags` (tags whose images are steered; None: all),
    `precision` ('fp32', 'fp16', 'bf16'), `encoder` (an already-built `ClipEncoder`; the loading args are then unused).
    """

    differentiable = True

    def __init__(
        self,
        model: str = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        checkpoint: str | None = None,
        alpha: float = 0.5,
        safe_anchors: Sequence[str] = DEFAULT_SAFE_ANCHORS,
        unsafe_anchors: Sequence[str] = DEFAULT_UNSAFE_ANCHORS,
        steer_only_tags: Sequence[str] | None = None,
        precision: str = "fp32",
        encoder: ClipEncoder | None = None,
    ):
        super().__init__()
        safe, unsafe = _phrases("safe_anchors", safe_anchors), _phrases("unsafe_anchors", unsafe_anchors)
        if isinstance(steer_only_tags, str):
            raise ValueError(f"steer_only_tags={steer_only_tags!r}: expected a list of tags, e.g. ['unsafe']")
        self.alpha = float(alpha)
        self.steer_only_tags = None if steer_only_tags is None else frozenset(steer_only_tags)
        self.encoder = (
            encoder if encoder is not None else OpenClipEncoder.load(model, pretrained, checkpoint, precision)
        )
        # One text-tower call for all anchors; the direction is a constant of the reward.
        anchors = self.encoder.encode_texts(safe + unsafe)
        self.direction = safe_direction(anchors[: len(safe)], anchors[len(safe) :])
        self.eval()

    def steer_mask(self, batch: int, tags: Sequence[str] | None) -> torch.Tensor:
        """(B,) bool: which images are scored against the steered target."""
        if self.steer_only_tags is None:
            return torch.ones(batch, dtype=torch.bool)
        if tags is None or len(tags) != batch:
            raise ValueError(f"steer_only_tags is set but context `tags` is {tags!r}; expected {batch} tags")
        return torch.tensor([tag in self.steer_only_tags for tag in tags], dtype=torch.bool)

    def forward(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> torch.Tensor:
        z_image = self.encoder.encode_images(images)
        z_prompt = self.encoder.encode_texts(prompts)
        if self.direction.device != z_prompt.device:  # moved once when the reward changes device
            self.direction = self.direction.to(z_prompt.device)
        steer = self.steer_mask(len(prompts), context.get("tags")).to(z_prompt.device)
        target = torch.where(steer[:, None], steered_targets(z_prompt, self.direction, self.alpha), z_prompt)
        return (z_image * target).sum(-1)
