"""The toy world's CLIP: a small open_clip model trained contrastively on toy images and captions.

It is what the `clip_steering` reward uses in the toy world (`model: toyworld`, see `rewards/clip_models.py`), and it
is saved in open_clip's own folder format, so `open_clip.create_model("local-dir:<folder>")` and
`open_clip.get_tokenizer("local-dir:<folder>")` load it without this package.

Two details matter on this data. With only 24 colour-shape pairs, a batch holds many captions that describe an image
equally well; plain CLIP's one-hot targets would push them apart, so every pair whose caption is true of the image is
a positive (soft targets spread over the positives of each row). And single concept words must mean something
("red" is a steering anchor), so part of the captions name only the colour or only the shape.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, set_model_preprocess_cfg
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from safetensors.torch import save_file
from tqdm.auto import tqdm

from rl_safety.outputs import atomic_folder
from rl_safety.rewards.clip_models import OpenClipEncoder

from . import ASSETS
from .data import COLOURS, SHAPES, SYNONYMS, make_dataset

CONTEXT_LENGTH = 16  # the longest toy caption is 10 BPE tokens with its start and end tokens
# A ModifiedResNet (convolutions learn shapes from few images; a ViT of this size stayed at chance on shape for 300
# steps where this one reached 99%). The text tower keeps open_clip's 49408-token BPE vocabulary, so that the
# standard tokenizer works; that embedding table is most of the weights, hence a narrow text width.
MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 2},
}
# Images in [0, 1] map to [-1, 1]; at 32 px open_clip's resize and crop are identities.
PREPROCESS_CFG: dict[str, Any] = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

# Partial captions: the colour word may be a training synonym (never a held-out one).
COLOUR_TEMPLATES = ("{colour}", "a {colour} shape", "something {colour}", "the colour {colour}")
SHAPE_TEMPLATES = ("{shape}", "a {shape}", "a picture of a {shape}")
CAPTION_KINDS = {"full": 0.5, "colour": 0.3, "shape": 0.2}  # share of each kind of caption in a batch
PARTIAL_SYNONYM_RATE = 0.4
# Zero-shot prompts of the held-out metrics.
COLOUR_PROMPT, SHAPE_PROMPT = "{colour}", "a {shape}"


def build_clip(model_cfg: dict[str, Any] = MODEL_CFG) -> CLIP:
    """A randomly initialised open_clip `CLIP` of this config, as `open_clip.create_model` builds it."""
    model = CLIP(**model_cfg)
    set_model_preprocess_cfg(model, merge_preprocess_dict(PreprocessCfg(), PREPROCESS_CFG))
    return model


def build_tokenizer(model_cfg: dict[str, Any] = MODEL_CFG) -> SimpleTokenizer:
    """open_clip's standard BPE tokenizer with the model's context length."""
    return SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) images in [0, 1] -> the model's pixel input (`PREPROCESS_CFG`; the reward does the same)."""
    mean = torch.tensor(PREPROCESS_CFG["mean"], device=images.device)[:, None, None]
    std = torch.tensor(PREPROCESS_CFG["std"], device=images.device)[:, None, None]
    return (images - mean) / std


def sample_texts(
    data: dict, index: torch.Tensor, generator: torch.Generator
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """One caption per image of `index`: its full caption, or one naming only its colour or only its shape.

    Returns the texts and, per text, the colour and shape ids it names (-1: not named).
    """
    colour_ids, shape_ids = data["colour"][index], data["shape"][index]
    n = len(index)
    kinds = torch.multinomial(torch.tensor(list(CAPTION_KINDS.values())), n, replacement=True, generator=generator)
    template = torch.randint(12, (n,), generator=generator)  # reduced modulo each kind's number of templates
    synonym = torch.rand(n, generator=generator) < PARTIAL_SYNONYM_RATE
    synonym_pick = torch.randint(2, (n,), generator=generator)
    colour_names = list(COLOURS)
    texts, text_colour, text_shape = [], colour_ids.clone(), shape_ids.clone()
    for i in range(n):
        kind = list(CAPTION_KINDS)[kinds[i]]
        if kind == "full":
            texts.append(data["captions"][index[i]])
        elif kind == "colour":
            colour = colour_names[colour_ids[i]]
            word = SYNONYMS[colour][synonym_pick[i]] if synonym[i] else colour
            texts.append(COLOUR_TEMPLATES[template[i] % len(COLOUR_TEMPLATES)].format(colour=word))
            text_shape[i] = -1
        else:
            shape = SHAPES[shape_ids[i]]
            texts.append(SHAPE_TEMPLATES[template[i] % len(SHAPE_TEMPLATES)].format(shape=shape))
            text_colour[i] = -1
    return texts, text_colour, text_shape


def positives(
    image_colour: torch.Tensor, image_shape: torch.Tensor, text_colour: torch.Tensor, text_shape: torch.Tensor
) -> torch.Tensor:
    """(B_images, B_texts) bool: the text is true of the image: every attribute it names matches (-1: unnamed).

    Colour and shape are the attributes that count; the size and background some full captions name are not
    matched, so "a small red circle" is a positive of every red circle.
    """
    colour_ok = (text_colour[None] == -1) | (text_colour[None] == image_colour[:, None])
    shape_ok = (text_shape[None] == -1) | (text_shape[None] == image_shape[:, None])
    return colour_ok & shape_ok


def multi_positive_clip_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with soft targets: each row's target is uniform over its positives.

    `logits` (B_images, B_texts) and `positive` (same shape, bool; every row and column has at least one positive,
    e.g. the image's own caption). With a one-hot `positive` this is the usual CLIP loss.
    """
    targets = positive.float()
    image_to_text = F.cross_entropy(logits, targets / targets.sum(1, keepdim=True))
    text_to_image = F.cross_entropy(logits.T, targets.T / targets.T.sum(1, keepdim=True))
    return (image_to_text + text_to_image) / 2


def train_clip(
    steps: int = 1500,
    batch_size: int = 256,
    seed: int = 0,
    num_images: int = 20000,
    lr: float = 2e-3,
    num_held_out: int = 2000,
    model_cfg: dict[str, Any] = MODEL_CFG,
) -> tuple[CLIP, dict[str, float], list[float]]:
    """Train on procedural images of `seed`; returns the model, its zero-shot accuracies on images of seed + 1000
    (`zero_shot_accuracy`) and the loss of every step."""
    torch.manual_seed(seed)
    data = make_dataset(num_images, seed=seed)
    model = build_clip(model_cfg)
    tokenizer = build_tokenizer(model_cfg)
    # open_clip's recipe: no weight decay on gains, biases and the temperature.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0}], lr=lr
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    # Redraws rarely when stderr is a log file rather than a terminal.
    progress = tqdm(range(steps), desc="clip", mininterval=0.5 if sys.stderr.isatty() else 30)
    for _ in progress:
        index = torch.randint(num_images, (batch_size,), generator=generator)
        texts, text_colour, text_shape = sample_texts(data, index, generator)
        image_features = F.normalize(model.encode_image(normalise(data["images"][index])), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        loss = multi_positive_clip_loss(
            logits, positives(data["colour"][index], data["shape"][index], text_colour, text_shape)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # open_clip's cap on the temperature: 1/100
            model.logit_scale.clamp_(0, torch.log(torch.tensor(100.0)))
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}", refresh=False)
    model.eval()
    return model, zero_shot_accuracy(model, tokenizer, make_dataset(num_held_out, seed=seed + 1000)), losses


@torch.no_grad()
def zero_shot_accuracy(model: CLIP, tokenizer: Any, data: dict) -> dict[str, float]:
    """Zero-shot accuracies: colour from the bare colour words ("red"), shape from "a {shape}", colour from the bare
    training synonyms (all 12 compete; right if the best names the image's colour), and the pair from
    "a {colour} {shape}" (24 prompts)."""
    images = F.normalize(model.encode_image(normalise(data["images"])), dim=-1)

    def predict(prompts: list[str]) -> torch.Tensor:
        texts = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        return (images @ texts.T).argmax(1)

    colours = list(COLOURS)
    synonym_colour = torch.tensor([i for i, c in enumerate(colours) for _ in SYNONYMS[c]])
    synonyms = [word for c in colours for word in SYNONYMS[c]]
    pairs = predict([f"a {c} {s}" for c in colours for s in SHAPES])
    truth_pairs = data["colour"] * len(SHAPES) + data["shape"]
    accuracies = {
        "colour_accuracy": predict([COLOUR_PROMPT.format(colour=c) for c in colours]) == data["colour"],
        "shape_accuracy": predict([SHAPE_PROMPT.format(shape=s) for s in SHAPES]) == data["shape"],
        "synonym_colour_accuracy": synonym_colour[predict(synonyms)] == data["colour"],
        "colour_shape_accuracy": pairs == truth_pairs,
    }
    return {name: round(ok.float().mean().item(), 4) for name, ok in accuracies.items()}


def save_clip(
    model: CLIP,
    directory: str | Path,
    metrics: dict[str, float],
    training: dict[str, Any] | None = None,
    model_cfg: dict[str, Any] = MODEL_CFG,
) -> Path:
    """open_clip's folder format (`open_clip_config.json` + `open_clip_model.safetensors`) and `metrics.json`
    ({"held_out": metrics, "training": how it was trained}), written to a temporary folder that replaces `directory`
    when complete."""
    directory = Path(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    files = {
        "open_clip_config.json": {"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS_CFG},
        "metrics.json": {"held_out": metrics, "training": training or {}},
    }
    with atomic_folder(directory) as tmp:
        save_file(state, str(tmp / "open_clip_model.safetensors"))
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
    return directory


def load_clip(directory: str | Path = ASSETS / "clip") -> OpenClipEncoder:
    """The saved CLIP as a frozen encoder (the `clip_steering` reward's; `clip_score` takes it), loaded through
    open_clip's own `local-dir:` path with the saved preprocessing."""
    return OpenClipEncoder.load(f"local-dir:{directory}")
