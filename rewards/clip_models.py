"""Shared plumbing of the CLIP-based rewards: weight loading, differentiable preprocessing, cached text embeddings.

Images reach a reward as float tensors in [0, 1] on the trainer's device; the CLIP input transform (antialiased
bicubic resize, center crop or pad, normalisation) is done on those tensors with torchvision's tensor ops, never
through PIL, so a reward is differentiable with respect to the pixels. Text towers are frozen, so each distinct string
is encoded once and its L2-normalised embedding kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
OPEN_CLIP_SCHEMAS = (HF_HUB_PREFIX, LOCAL_DIR_PREFIX)  # open_clip model names that carry config and weights
OPEN_CLIP_CONFIG = "open_clip_config.json"  # what makes a folder an open_clip `local-dir:` model
# CLIPs shipped with the package, by short name: folders under rl_safety/toyworld/assets in open_clip's format.
SHIPPED_OPEN_CLIP = {"toyworld": "clip"}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# PIL / transformers resample codes -> torchvision modes (PIL.Image.Resampling.BILINEAR = 2, BICUBIC = 3).
_RESAMPLE = {2: "bilinear", 3: "bicubic", "bilinear": "bilinear", "bicubic": "bicubic"}


def resolve_file(ref: str | Path) -> str:
    """A local file path, or `hf-hub:<org>/<repo>/<path in repo>` downloaded (and cached) by huggingface_hub."""
    ref = str(ref)
    if ref.startswith(HF_HUB_PREFIX):
        org, repo, *rest = ref[len(HF_HUB_PREFIX) :].split("/")
        if not rest:
            raise ValueError(f"{ref!r}: expected 'hf-hub:<org>/<repo>/<file>'")
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=f"{org}/{repo}", filename="/".join(rest))
    path = Path(ref).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{ref!r} is neither a file nor an 'hf-hub:<org>/<repo>/<file>' reference")
    return str(path)


def load_state_dict(ref: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` / torch file (local or `hf-hub:`), unwrapped from `{'state_dict': ...}`."""
    from open_clip.factory import load_state_dict as open_clip_load

    # open_clip's loader reads both formats with weights_only=True and strips DDP's `module.` prefix.
    return open_clip_load(resolve_file(ref), device="cpu")


def torch_dtype(precision: str) -> torch.dtype:
    """The dtype of a precision name ('fp32', 'fp16', 'bf16')."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {sorted(PRECISIONS)}")
    return PRECISIONS[precision]


def open_clip_name(model: str) -> str:
    """open_clip's name for `model`: a shipped CLIP's short name (`SHIPPED_OPEN_CLIP`) or a folder holding
    `open_clip_config.json` becomes `local-dir:<folder>`; anything else is returned unchanged."""
    import open_clip

    if model in SHIPPED_OPEN_CLIP:
        from rl_safety.toyworld import ASSETS  # the package's assets folder; a light import

        return f"{LOCAL_DIR_PREFIX}{ASSETS / SHIPPED_OPEN_CLIP[model]}"
    if model.startswith(OPEN_CLIP_SCHEMAS) or model in open_clip.list_models():
        return model
    if (Path(model).expanduser() / OPEN_CLIP_CONFIG).is_file():
        return f"{LOCAL_DIR_PREFIX}{Path(model).expanduser()}"
    return model


def load_open_clip(
    model: str, pretrained: str | None = None, checkpoint: str | None = None, precision: str = "fp32"
) -> tuple[torch.nn.Module, Any]:
    """An open_clip model and its tokenizer. `model`: an architecture name, open_clip's `hf-hub:<org>/<repo>` /
    `local-dir:<path>`, a folder in that format (`open_clip_config.json` + weights), or a shipped CLIP's name
    (`toyworld`); `pretrained`: an open_clip tag or a weights file (local or `hf-hub:<org>/<repo>/<file>`);
    `checkpoint`: a state dict loaded over it (e.g. HPSv2's fine-tuned ViT-H-14)."""
    import open_clip
    from open_clip.pretrained import is_pretrained_cfg

    torch_dtype(precision)  # validate before a multi-GB download
    given, model = model, open_clip_name(model)
    if model.startswith(OPEN_CLIP_SCHEMAS):
        if pretrained:
            raise ValueError(f"model={given!r} brings its own weights; set pretrained to null (use `checkpoint`)")
    elif model not in open_clip.list_models():
        raise ValueError(
            f"model={model!r}: not an open_clip architecture (see open_clip.list_models()), a folder holding "
            f"{OPEN_CLIP_CONFIG}, nor a shipped CLIP ({', '.join(sorted(SHIPPED_OPEN_CLIP))})"
        )
    if pretrained and not is_pretrained_cfg(model, pretrained):
        pretrained = resolve_file(pretrained)
    clip = open_clip.create_model(model, pretrained=pretrained, precision=precision)
    if checkpoint:
        # open_clip's loader unwraps {'state_dict': ...} and `module.` prefixes (HPSv2 checkpoints have both).
        open_clip.load_checkpoint(clip, resolve_file(checkpoint), strict=True)
    return clip, open_clip.get_tokenizer(model)


class EvalOnly(torch.nn.Module):
    """A module that stays in eval mode: a frozen scorer with dropout active would make its reward noisy."""

    def train(self, mode: bool = True) -> EvalOnly:
        return super().train(False)


class ClipPreprocess(torch.nn.Module):
    """(B, 3, H, W) images in [0, 1] -> CLIP pixel input: resize, crop or pad, normalise, in torch (differentiable).

    `resize_mode` follows open_clip: 'shortest' scales the shorter side to `resize_size` (default: the crop size)
    and center-crops (open_clip's and CLIPImageProcessor's inference transform); 'longest' scales the longer side
    to the size and zero-pads (HPSv2's transform); 'squash' resizes straight to the size. `clamp` clips the
    resampled pixels to [0, 1] as pipelines that resize uint8 images (PIL) do; HPSv2 resizes floats and does not.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        resize_size: int | None = None,
        clamp: bool = True,
    ):
        super().__init__()
        self.size = [size, size] if isinstance(size, int) else [int(s) for s in size]
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation={interpolation!r}: expected 'bicubic' or 'bilinear'")
        if resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"resize_mode={resize_mode!r}: expected 'shortest', 'longest' or 'squash'")
        if resize_mode == "shortest" and resize_size is None and self.size[0] != self.size[1]:
            raise ValueError(f"size={self.size}: a non-square crop needs `resize_size` (shortest-edge target)")
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.interpolation = InterpolationMode(interpolation)
        self.resize_mode = resize_mode
        self.resize_size = resize_size if resize_size is not None else self.size[0]
        self.clamp = clamp

    @classmethod
    def from_open_clip(cls, model: torch.nn.Module, clamp: bool = True) -> ClipPreprocess:
        """The inference transform open_clip attached to `model` (`model.visual.preprocess_cfg`)."""
        cfg = model.visual.preprocess_cfg
        return cls(cfg["size"], cfg["mean"], cfg["std"], cfg["interpolation"], cfg["resize_mode"], clamp=clamp)

    @classmethod
    def from_image_processor(cls, processor: Any) -> ClipPreprocess:
        """The transform of a transformers `CLIPImageProcessor` (shortest-edge resize, crop, rescale, normalise)."""
        crop = processor.crop_size
        size = [crop["height"], crop["width"]] if processor.do_center_crop else None
        resize = processor.size
        if resize.get("shortest_edge") is not None:
            mode, resize_size = "shortest", resize["shortest_edge"]
            size = size or [resize_size, resize_size]
        else:
            mode, resize_size, size = "squash", None, [resize["height"], resize["width"]]
        interpolation = _RESAMPLE.get(getattr(processor.resample, "value", processor.resample))
        if interpolation is None:
            raise ValueError(f"resample={processor.resample!r}: only bilinear and bicubic are supported")
        return cls(size, processor.image_mean, processor.image_std, interpolation, mode, resize_size)

    def _resized_size(self, height: int, width: int) -> list[int]:
        """The `size` argument of torchvision's resize for an image of this size."""
        if self.resize_mode == "shortest":
            return [self.resize_size]  # torchvision's shortest-edge rule, as Resize(int) applies to PIL images
        if self.resize_mode == "longest":
            # open_clip's ResizeKeepRatio(longest=1) and HPSv2's ResizeMaxSize both round each side.
            scale = min(self.size[0] / height, self.size[1] / width)
            return [round(height * scale), round(width * scale)]
        return self.size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        # Resampling in float32 whatever the trainer's dtype: bicubic in bf16 visibly shifts the CLIP embedding.
        x = images.float()
        size = self._resized_size(*x.shape[-2:])
        x = TF.resize(x, size, interpolation=self.interpolation, antialias=True)  # identity when already that size
        # center_crop zero-pads a side shorter than the crop (the 'longest' mode), as open_clip and HPSv2 do.
        x = TF.center_crop(x, self.size)
        if self.clamp:
            x = x.clamp(0, 1)
        return TF.normalize(x, self.mean, self.std)


class TextEmbeddingCache:
    """L2-normalised float32 text embeddings, computed once per distinct string by a frozen text encoder."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor]):
        self.encode = encode
        self.store: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        """(N, D) embeddings of `texts` on `device`; unseen strings are encoded in one batched call."""
        distinct = list(dict.fromkeys(texts))
        missing = [t for t in distinct if t not in self.store]
        if missing:
            with torch.no_grad():
                embeddings = F.normalize(self.encode(missing).float(), dim=-1)
            self.store.update(zip(missing, embeddings.unbind(0)))
        if device is not None:
            # Entries follow the reward to its device once, not on every call.
            for t in distinct:
                if self.store[t].device != device:
                    self.store[t] = self.store[t].to(device)
        return torch.stack([self.store[t] for t in texts])


class ClipEncoder(EvalOnly):
    """A frozen CLIP: differentiable normalised image embeddings and cached normalised text embeddings."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, preprocess: ClipPreprocess):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.text_cache = TextEmbeddingCache(self._text_features)
        self.eval()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def image_tower(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def pixel_dtype(self) -> torch.dtype:
        """The dtype the image tower takes: its first convolution's (under fp16/bf16 open_clip keeps some
        parameters, e.g. the class embedding, in float32, so the first parameter's dtype is not it)."""
        convs = (m for m in self.image_tower.modules() if isinstance(m, torch.nn.Conv2d))
        first = next(convs, None)
        return first.weight.dtype if first is not None else next(self.image_tower.parameters()).dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        """The model's learned log temperature (a parameter of both open_clip and transformers CLIP)."""
        return self.model.logit_scale

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) float32 L2-normalised embeddings of (B, 3, H, W) images in [0, 1]; one batched tower call."""
        pixels = self.preprocess(images.to(self.device)).to(self.pixel_dtype)
        return F.normalize(self._image_features(pixels).float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings of `texts`, cached per distinct string."""
        return self.text_cache(texts, self.device)


class OpenClipEncoder(ClipEncoder):
    """An open_clip CLIP model with its tokenizer and its own preprocessing config."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, preprocess: ClipPreprocess | None = None):
        super().__init__(
            model, tokenizer, preprocess if preprocess is not None else ClipPreprocess.from_open_clip(model)
        )

    @classmethod
    def load(
        cls, model: str, pretrained: str | None = None, checkpoint: str | None = None, precision: str = "fp32"
    ) -> OpenClipEncoder:
        """An encoder over `load_open_clip(...)` with the model's own preprocessing."""
        return cls(*load_open_clip(model, pretrained, checkpoint, precision))

    @property
    def image_tower(self) -> torch.nn.Module:
        return self.model.visual

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


@torch.no_grad()
def clip_score(encoder: ClipEncoder, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """CLIPScore of each image with its prompt: 100 * max(cos(image, prompt), 0), float32 (B,).

    The scale of torchmetrics' `CLIPScore` (Hessel et al. use 2.5 instead of 100); one image-tower call for the
    batch and one text-tower call for the unseen prompts. An evaluation metric, so no gradient.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts; expected one prompt per image")
    cosine = (encoder.encode_images(images) * encoder.encode_texts(prompts)).sum(-1)
    return 100 * cosine.clamp(min=0)


class HFClipEncoder(ClipEncoder):
    """A transformers `CLIPModel` with its tokenizer; images go through the processor's transform, in torch."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, preprocess: ClipPreprocess, max_length: int = 77):
        super().__init__(model, tokenizer, preprocess)
        self.max_length = max_length

    @classmethod
    def load(cls, model: str, processor: str | None = None, precision: str = "fp32") -> HFClipEncoder:
        """`CLIPModel.from_pretrained(model)` with the tokenizer and image processor of `processor` (or `model`)."""
        from transformers import AutoProcessor, CLIPModel

        clip = CLIPModel.from_pretrained(model, dtype=torch_dtype(precision))
        proc = AutoProcessor.from_pretrained(processor or model)
        return cls(clip, proc.tokenizer, ClipPreprocess.from_image_processor(proc.image_processor))

    @staticmethod
    def _pooled(output: Any) -> torch.Tensor:
        # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output holds the projected features.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @property
    def image_tower(self) -> torch.nn.Module:
        return self.model.vision_model

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._pooled(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return self._pooled(self.model.get_text_features(**tokens))
