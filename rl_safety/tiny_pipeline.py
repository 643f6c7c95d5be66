"""A tiny, randomly initialised Stable Diffusion pipeline built offline from configs.

It has every component of a real SD 1.x checkpoint (CLIPTokenizer, CLIPTextModel, AutoencoderKL,
UNet2DConditionModel, DDIMScheduler) and is saved with `save_pretrained`, so code under test loads it through the
same `from_pretrained` path as a hub checkpoint. Tests, the benchmark and the smoke recipe use it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .outputs import atomic_folder

# SD 1.x scheduler settings (scaled-linear betas, "leading" spacing with offset 1).
SD_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes (same table as GPT-2)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def build_tiny_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """A character-level CLIPTokenizer (no merges) over all bytes: ~500 tokens, any text encodes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )


def assemble_pipeline(tokenizer, text_encoder, vae, unet) -> StableDiffusionPipeline:
    """An SD pipeline from its networks, with SD 1.x's DDIM scheduler and no safety checker."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def text_encoder_config(tokenizer: CLIPTokenizer, width: int, layers: int, heads: int) -> CLIPTextConfig:
    """A CLIP text-encoder config sized by the caller, with the tokenizer's vocabulary and special-token ids."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width if width >= 256 else 2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_pipeline(seed: int = 0, resolution: int = 32) -> StableDiffusionPipeline:
    """Random tiny SD components: a 2-level UNet (32/64 channels, cross-attention at both levels, as SD has at its
    top resolution), a 2× VAE and a 2-layer text encoder of width 32."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer, width=32, layers=2, heads=4))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return assemble_pipeline(tokenizer, text_encoder, vae, unet)


def save_tiny_pipeline(output_dir: str | Path, seed: int = 0, resolution: int = 32) -> Path:
    """Build the tiny pipeline and save it in diffusers format; written to a temp dir then renamed (atomic)."""
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} exists; remove it or choose another --output_dir")
    pipe = build_tiny_pipeline(seed=seed, resolution=resolution)
    with atomic_folder(output_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return output_dir
