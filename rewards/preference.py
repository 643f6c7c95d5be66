"""Human-preference rewards on frozen CLIP models, differentiable in the pixels: HPSv2/2.1, LAION aesthetic, PickScore.

All three embed images through the torch preprocessing of `clip_models` (no PIL round trip) and cache text
embeddings per prompt, so they serve as GRPO rewards and as differentiable objectives alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Reward
from .clip_models import (
    ClipEncoder,
    ClipPreprocess,
    EvalOnly,
    HFClipEncoder,
    OpenClipEncoder,
    load_open_clip,
    load_state_dict,
)

HPS_V21_CHECKPOINT = "hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt"
# The improved-aesthetic-predictor MLP (sac+logos+ava1-l14-linearMSE) as republished for DDPO by TRL.
AESTHETIC_MLP_HEAD = "hf-hub:trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"


def hpsv2_preprocess(size: int | Sequence[int]) -> ClipPreprocess:
    """HPSv2's inference transform: ToTensor, bicubic resize of the longest side, zero padding, OpenAI mean/std.

    HPSv2 resizes float tensors, so the result is not clamped; for square images it is a plain resize.
    """
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return ClipPreprocess(size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, "bicubic", "longest", clamp=False)


class HPSv2(EvalOnly, Reward):
    """Human Preference Score v2 / v2.1: `scale` · cos(image, prompt) on HPSv2's fine-tuned open_clip ViT-H-14.

    Args: `model` (open_clip architecture), `pretrained` (open_clip tag or weights file loaded first; None skips it,
    since the checkpoint holds the whole model), `checkpoint` (HPSv2 weights, local or `hf-hub:<org>/<repo>/<file>`;
    v2: `hf-hub:xswu/HPSv2/HPS_v2_compressed.pt`), `scale` (100: the paper's tables, where scores are ~20-30),
    `precision`, `encoder` (an already-built `ClipEncoder`, used with its own preprocessing; the loading args are
    then unused). Images are preprocessed as HPSv2 does (`hpsv2_preprocess`).
    """

    differentiable = True

    def __init__(
        self,
        model: str = "ViT-H-14",
        pretrained: str | None = None,
        checkpoint: str | None = HPS_V21_CHECKPOINT,
        scale: float = 100.0,
        precision: str = "fp32",
        encoder: ClipEncoder | None = None,
    ):
        super().__init__()
        self.scale = float(scale)
        if encoder is None:
            clip, tokenizer = load_open_clip(model, pretrained, checkpoint, precision)
            encoder = OpenClipEncoder(clip, tokenizer, hpsv2_preprocess(clip.visual.preprocess_cfg["size"]))
        self.encoder = encoder
        self.eval()

    def forward(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> torch.Tensor:
        z_image = self.encoder.encode_images(images)
        return self.scale * (z_image * self.encoder.encode_texts(prompts)).sum(-1)


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head: linear layers with dropout and no activations, as trained.

    Parameter names (`layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7`) match the published state dicts.
    """

    def __init__(self, embed_dim: int = 768, hidden: Sequence[int] = (1024, 128, 64, 16)):
        super().__init__()
        h1, h2, h3, h4 = hidden
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(embed_dim, h1),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(h1, h2),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(h2, h3),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(h3, h4),
            torch.nn.Linear(h4, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def aesthetic_head(state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The head a LAION aesthetic state dict describes: `AestheticMLP` (`layers.*` keys) or `nn.Linear(D, 1)`."""
    if "layers.0.weight" in state_dict:
        dims = [state_dict[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6)]
        head: torch.nn.Module = AestheticMLP(dims[0][1], [d[0] for d in dims])
    elif set(state_dict) == {"weight", "bias"}:
        head = torch.nn.Linear(state_dict["weight"].shape[1], state_dict["weight"].shape[0])
    else:
        raise ValueError(
            f"unrecognised aesthetic head keys {sorted(state_dict)[:6]}; expected 'layers.*' or weight/bias"
        )
    head.load_state_dict(state_dict)
    return head


class LaionAesthetic(EvalOnly, Reward):
    """LAION aesthetic score (~1-10): a linear or MLP head on the L2-normalised CLIP ViT-L/14 image embedding.

    Prompt-independent. Args: `model` / `pretrained` (open_clip; the heads were trained on OpenAI's ViT-L/14),
    `head` (state dict, local or `hf-hub:<org>/<repo>/<file>`: the improved-aesthetic-predictor MLP or LAION's
    linear `sa_0_4_vit_l_14_linear.pth`), `precision`, `encoder` / `head_module` (already-built parts; the
    matching loading args are then unused).
    """

    differentiable = True

    def __init__(
        self,
        model: str = "ViT-L-14-quickgelu",
        pretrained: str | None = "openai",
        head: str = AESTHETIC_MLP_HEAD,
        precision: str = "fp32",
        encoder: ClipEncoder | None = None,
        head_module: torch.nn.Module | None = None,
    ):
        super().__init__()
        self.encoder = encoder if encoder is not None else OpenClipEncoder.load(model, pretrained, None, precision)
        head_module = head_module if head_module is not None else aesthetic_head(load_state_dict(head))
        self.head = head_module.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> torch.Tensor:
        z_image = self.encoder.encode_images(images)
        weight = next(self.head.parameters())
        return self.head(z_image.to(weight.device, weight.dtype)).float().squeeze(-1)


class PickScore(EvalOnly, Reward):
    """PickScore: logit_scale.exp() · cos(image, prompt) on a transformers CLIP-H fine-tuned on Pick-a-Pic.

    Args: `model` (hub id or directory of the `CLIPModel`), `processor` (hub id or directory of the tokenizer and
    image processor; PickScore uses CLIP-H's), `precision`, `encoder` (an already-built `ClipEncoder`, e.g.
    `HFClipEncoder`; the loading args are then unused).
    """

    differentiable = True

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        precision: str = "fp32",
        encoder: ClipEncoder | None = None,
    ):
        super().__init__()
        self.encoder = encoder if encoder is not None else HFClipEncoder.load(model, processor, precision)
        self.eval()

    def forward(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> torch.Tensor:
        z_image = self.encoder.encode_images(images)
        cosine = (z_image * self.encoder.encode_texts(prompts)).sum(-1)
        return self.encoder.logit_scale.float().exp() * cosine
