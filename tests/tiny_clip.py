"""Tiny, randomly initialised CLIP models built offline from configs, for the CLIP reward tests.

The open_clip model is registered under `TINY_OPEN_CLIP` with `open_clip.add_model_config`, so it is built (and
its tokenizer, which ships its BPE vocabulary, looked up) exactly like a named open_clip architecture. The
transformers one pairs a `CLIPModel` from a `CLIPConfig` with the char-level `CLIPTokenizer` of the tiny pipeline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

TINY_OPEN_CLIP = "rl-safety-tiny-clip"
TINY_IMAGE_SIZE = 32
TINY_EMBED_DIM = 16
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": TINY_EMBED_DIM,
    "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    # A short context keeps the text tower cheap; open_clip's tokenizer reads it from this config.
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_open_clip() -> str:
    """Register the tiny config with open_clip (once per process) and return its model name."""
    import open_clip

    if TINY_OPEN_CLIP not in open_clip.list_models():
        # open_clip reads the file when registering and keeps the config in memory, so the file can go.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{TINY_OPEN_CLIP}.json"
            path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
            open_clip.add_model_config(path)
    return TINY_OPEN_CLIP


def build_tiny_open_clip(seed: int = 0) -> torch.nn.Module:
    """A random tiny open_clip CLIP, built by name like any open_clip architecture."""
    import open_clip

    name = register_tiny_open_clip()
    torch.manual_seed(seed)
    return open_clip.create_model(name)


def build_tiny_hf_clip(seed: int = 0):
    """A random tiny transformers `CLIPModel`, its char-level `CLIPTokenizer` and a matching `CLIPImageProcessor`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from rl_safety.tiny_pipeline import build_tiny_tokenizer, text_encoder_config

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp)
    text = text_encoder_config(tokenizer, width=32, layers=1, heads=2).to_dict()
    vision = dict(
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY_EMBED_DIM))
    processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        resample=3,
    )
    return model, tokenizer, processor
