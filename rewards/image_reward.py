"""ImageReward (Xu et al., 2023), the human-preference reward model of THUDM, rebuilt on transformers' BLIP modules.

The released model is a BLIP ViT image encoder, a BERT text encoder whose layers cross-attend to the image tokens,
and a linear MLP head on the text encoder's first ([CLS]) output, normalised by fixed constants. We do not depend on
the `image-reward` package: it does not import under transformers 5 (its BLIP copy imports helpers that
`transformers.modeling_utils` no longer has, and it pins timm 0.6.13 and fairscale 0.4.13). The same computation
maps onto transformers' `BlipVisionModel` and `BlipTextModel`; the released checkpoint `ImageReward.pt` is loaded
with its keys renamed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from .base import Reward

logger = logging.getLogger(__name__)

HUB_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
LOCAL_SUFFIXES = (".pt", ".pth", ".bin", ".json", ".safetensors", ".ckpt")  # names of files, never of Hub repos
# The released head's output statistics; the package reports (mlp - mean) / std.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
_TOKEN_CACHE_SIZE = 100_000
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Prefixes of checkpoint entries the score never uses (BLIP's contrastive projections).
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
# timm ViT names (the package's `blip.visual_encoder.*`) -> `BlipVisionModel` names; the fused qkv is kept as is.
_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm([12])\.", r"encoder.layers.\1.layer_norm\2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _resolve_file(location: str | os.PathLike, filename: str) -> str:
    """A local file, `filename` inside a local folder, or `filename` downloaded from the hub repo `location`."""
    path = Path(location).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        if (path / filename).is_file():
            return str(path / filename)
        raise FileNotFoundError(f"{filename} not found in folder {path}")
    text = str(location)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or path.suffix.lower() in LOCAL_SUFFIXES:
        # A path, not a Hub id ('owner/name'): say so instead of asking the Hub for it.
        raise FileNotFoundError(f"no such file or folder {text!r} (a Hub repository is named 'owner/name')")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=str(location), filename=filename)


def _default_med_config(checkpoint: str | os.PathLike) -> str:
    """Where med_config.json lives when not given: beside a local checkpoint, else in the checkpoint's hub repo."""
    path = Path(checkpoint).expanduser()
    if path.is_file():
        sibling = path.with_name(MED_CONFIG_FILE)
        if not sibling.is_file():
            raise FileNotFoundError(f"no {MED_CONFIG_FILE} beside {path}; pass `med_config`")
        return str(sibling)
    return _resolve_file(checkpoint, MED_CONFIG_FILE)


def split_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split the package's state dict into `vision` / `text` / `mlp` state dicts with transformers' BLIP key names."""
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "mlp": {}}
    unexpected = []
    for key, value in state_dict.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, replacement in _VISION_RENAMES:
                name, count = re.subn(pattern, replacement, name)
                if count:
                    parts["vision"][name] = value
                    break
            else:
                unexpected.append(key)
        elif key.startswith("blip.text_encoder."):
            # position_ids is a non-persistent buffer in transformers, rebuilt by the module itself.
            if not key.endswith("embeddings.position_ids"):
                parts["text"][key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            parts["mlp"][key.removeprefix("mlp.")] = value
        elif not key.startswith(_UNUSED_PREFIXES):
            unexpected.append(key)
    if unexpected:
        logger.warning("ImageReward checkpoint: ignoring %d unknown entries, e.g. %s", len(unexpected), unexpected[:5])
    return parts


def vision_config_from_weights(vision: Mapping[str, torch.Tensor], num_heads: int | None = None) -> BlipVisionConfig:
    """The ViT's shape read off its (renamed) weights; heads cannot be, so they default to 64 channels a head."""
    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = math.isqrt(vision["embeddings.position_embedding"].shape[1] - 1)
    depth = len({key.split(".")[2] for key in vision if key.startswith("encoder.layers.")})
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        # ViT-B/16 and ViT-L/16 (the released model) both use 64-channel heads.
        num_attention_heads=num_heads or max(width // 64, 1),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",  # exact erf GELU, as timm's nn.GELU
        layer_norm_eps=1e-6,  # timm ViT's LayerNorm eps, not BlipVisionConfig's 1e-5 default
        attention_dropout=0.0,
    )


def text_config_from_med(
    med_config: Mapping[str, Any], encoder_width: int, tokenizer: BertTokenizer | None = None
) -> BlipTextConfig:
    """BlipTextConfig for BLIP's med_config.json; the cross-attention width is the ViT's, as BLIP overrides it."""
    # The special ids only matter for generation; taken from the tokenizer so the config is self-consistent.
    special = {"bos_token_id": None, "eos_token_id": None, "sep_token_id": None}
    if tokenizer is not None:
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "sep_token_id": tokenizer.sep_token_id,
        }
    return BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        # Dropout off for good: the trainer never calls .eval() on rewards, and a reward must be deterministic.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        # `is_decoder` only makes the layers build their cross-attention; forward runs with is_decoder=False
        # (bidirectional self-attention), as BLIP's encoder does.
        is_decoder=True,
        use_cache=False,
        **special,
    )


def _no_init() -> contextlib.AbstractContextManager:
    """transformers' context that skips weight init, or a no-op where this transformers version lacks it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older/newer layouts
        return contextlib.nullcontext()
    return no_init_weights()


class RewardHead(nn.Module):
    """ImageReward's MLP: five linear layers, no activations; indices 1, 3, 5 were dropouts (kept for key names)."""

    def __init__(self, input_size: int):
        super().__init__()
        sizes = (input_size, 1024, 128, 64, 16)
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < 3:
                layers.append(nn.Identity())  # was Dropout; identity so train mode cannot change the score
        layers.append(nn.Linear(16, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) reward (B, 1) of text-encoder [CLS] features (B, hidden)."""
        return self.layers(features)


def load_tokenizer(name_or_path: str | os.PathLike) -> BertTokenizer:
    """BLIP's tokenizer: a BERT WordPiece vocabulary plus the [DEC] (bos) and [ENC] tokens BLIP appends."""
    tokenizer = BertTokenizer.from_pretrained(str(name_or_path))
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(Reward):
    """ImageReward human-preference score of each image for its prompt (higher is better; roughly N(0, 1))."""

    differentiable = True

    def __init__(
        self,
        checkpoint: str | os.PathLike = HUB_REPO,
        med_config: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike = "bert-base-uncased",
        vision_num_heads: int | None = None,
    ):
        super().__init__()
        file = _resolve_file(checkpoint, CHECKPOINT_FILE)
        try:
            state_dict = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as err:
            problem = f"not a readable torch checkpoint ({_first_line(err)})"
            raise ValueError(f"checkpoint={str(checkpoint)!r}: {problem}") from err
        if med_config is None:
            med_config = _default_med_config(checkpoint)
        med = json.loads(Path(_resolve_file(med_config, MED_CONFIG_FILE)).read_text())
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"checkpoint={str(checkpoint)!r}: holds a {type(state_dict).__name__}, not a state dict")
        parts = split_checkpoint(state_dict)
        try:
            vision_config = vision_config_from_weights(parts["vision"], vision_num_heads)
        except KeyError as err:
            raise ValueError(f"checkpoint={str(checkpoint)!r}: not an ImageReward checkpoint (no {err})") from err
        self.tokenizer = load_tokenizer(tokenizer)
        text_config = text_config_from_med(med, vision_config.hidden_size, self.tokenizer)
        if len(self.tokenizer) > text_config.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer!r} has {len(self.tokenizer)} tokens with [DEC]/[ENC]; the text encoder has "
                f"{text_config.vocab_size}"
            )
        # Every weight is overwritten by the checkpoint, so skip transformers' (slow, for ViT-L) random init.
        with _no_init():
            self.vision = BlipVisionModel(vision_config)
            self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = RewardHead(text_config.hidden_size)
        try:
            self.vision.load_state_dict(parts["vision"], strict=True)
            self.text.load_state_dict(parts["text"], strict=True)
            self.head.load_state_dict(parts["mlp"], strict=True)
        except RuntimeError as err:
            raise ValueError(f"checkpoint={str(checkpoint)!r}: does not fit ImageReward ({_first_line(err)})") from err
        self.image_size = vision_config.image_size
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # A frozen scorer: gradients go to the images only, never into these weights.
        self.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        """Where the weights are (the trainer moves them with `.to()`)."""
        return self.head.layers[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype; pixels are cast to it."""
        return self.head.layers[0].weight.dtype

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids and attention mask (B, 35) on the model's device, padded/truncated to 35 tokens as in training."""
        if len(self._token_cache) > _TOKEN_CACHE_SIZE:
            self._token_cache.clear()  # bounded: generated prompts would otherwise grow it without end
        new = [p for p in dict.fromkeys(prompts) if p not in self._token_cache]
        if new:
            # One tokenizer call for all the batch's new prompts.
            encoded = self.tokenizer(
                new, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
            )
            self._token_cache.update(zip(new, zip(encoded.input_ids, encoded.attention_mask)))
        input_ids = torch.stack([self._token_cache[p][0] for p in prompts]).to(self.device)
        attention_mask = torch.stack([self._token_cache[p][1] for p in prompts]).to(self.device)
        return input_ids, attention_mask

    def score_pixels(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Normalised reward (B,) of preprocessed pixel values (B, 3, 224, 224) and tokenised prompts."""
        image_tokens = self.vision(pixel_values=pixel_values.to(self.dtype)).last_hidden_state
        # Every image token is attended to (no image padding), so no encoder_attention_mask is needed.
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            is_decoder=False,
        ).last_hidden_state
        raw = self.head(text[:, 0]).squeeze(-1)
        raw = raw.to(torch.promote_types(raw.dtype, torch.float32))  # half precision in, float32 out
        return (raw - REWARD_MEAN) / REWARD_STD

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable resize (short side), center crop and CLIP normalisation of (B, 3, H, W) images in [0, 1]."""
        height, width = images.shape[-2:]
        size = self.image_size
        short, long = min(height, width), max(height, width)
        # Same output size rule as torchvision's Resize(int): long side truncated, not rounded.
        new_long = int(size * long / short)
        new_size = (size, new_long) if height <= width else (new_long, size)
        if new_size != (height, width):
            # antialias=True gives PIL's bicubic (a = -0.5, widened kernel when shrinking); clamp like uint8 output.
            images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
            images = images.clamp(0, 1)
        top = int(round((new_size[0] - size) / 2.0))
        left = int(round((new_size[1] - size) / 2.0))
        images = images[..., top : top + size, left : left + size]
        return (images - self.pixel_mean.to(images)) / self.pixel_std.to(images)

    def preprocess_pil(self, image: Image.Image | str | os.PathLike) -> torch.Tensor:
        """The package's exact preprocessing of one PIL image or path: (3, 224, 224) float32 on CPU."""
        if not isinstance(image, Image.Image):
            image = Image.open(image)
        size = self.image_size
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)
        new_size = (size, new_long) if width <= height else (new_long, size)  # PIL sizes are (width, height)
        if new_size != (width, height):
            image = image.resize(new_size, Image.Resampling.BICUBIC)
        left = int(round((new_size[0] - size) / 2.0))
        top = int(round((new_size[1] - size) / 2.0))
        image = image.crop((left, top, left + size, top + size)).convert("RGB")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        return (pixels - self.pixel_mean[0].cpu()) / self.pixel_std[0].cpu()

    def forward(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> torch.Tensor:
        """Differentiable reward (B,) of (B, 3, H, W) images in [0, 1]: one tokenizer call, one pass per encoder."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        input_ids, attention_mask = self.tokenize(prompts)
        return self.score_pixels(self.preprocess(images), input_ids, attention_mask).to(images.device)

    @torch.no_grad()
    def score_files(
        self, prompt: str, images: Sequence[Image.Image | str | os.PathLike], batch_size: int = 32
    ) -> list[float]:
        """Rewards of PIL images or image files for one prompt, with the package's exact (PIL) preprocessing."""
        scores: list[float] = []
        # In chunks, so that a whole folder does not become one ViT-L batch.
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = torch.stack([self.preprocess_pil(image) for image in chunk]).to(self.device)
            scores += self.score_pixels(pixels, *self.tokenize([prompt] * len(chunk))).tolist()
        return scores

    def score(self, prompt: str, image: Image.Image | str | os.PathLike) -> float:
        """Reward of one PIL image or image file for `prompt` (the package's `score`)."""
        return self.score_files(prompt, [image])[0]

    def inference_rank(
        self, prompt: str, images: Sequence[Image.Image | str | os.PathLike]
    ) -> tuple[list[int], list[float]]:
        """1-based rank of each image (1 = best) and the rewards, as the package's `inference_rank`."""
        rewards = self.score_files(prompt, images)
        order = sorted(range(len(rewards)), key=lambda i: -rewards[i])
        ranks = [0] * len(rewards)
        for position, index in enumerate(order, start=1):
            ranks[index] = position
        return ranks, rewards
