"""Pretrain the toy world's Stable Diffusion pipeline from scratch on the 2-core CPU.

Two stages, each resumable from its own checkpoint in `output_dir`:
  1. a small AutoencoderKL (32 px → 16×16×4 latents), trained on the rendered images;
  2. a UNet2DConditionModel and a CLIPTextModel trained jointly on the latents (epsilon prediction, SD 1.x noise
     schedule, caption dropout for classifier-free guidance, EMA of both networks' weights).
The EMA weights are exported as a standard diffusers folder (`output_dir/pipeline`) that loads with
`StableDiffusionPipeline.from_pretrained`. The tokenizer is word-level over the toy vocabulary (every caption word,
held-out synonyms included, is one token) with a byte-level fallback, so any prompt still encodes. The folder is
written in the layout of SD checkpoints on the Hub, which transformers 4 and 5 both read (`write_portable_layout`).

    python -m rl_safety.toyworld.pretrain --output_dir runs/toyworld --vae_steps 2000 --unet_steps 15000
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pickle
import re
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rl_safety.checks import check_fields, check_output_folder, check_seed
from rl_safety.command import ArgumentParser, first_line, load_error, run_command
from rl_safety.errors import ConfigError
from rl_safety.outputs import atomic_folder, atomic_write_text
from rl_safety.tiny_pipeline import SD_SCHEDULER_CONFIG, byte_level_alphabet
from rl_safety.toyworld.data import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_SYNONYMS,
    SHAPES,
    SIZES,
    SYNONYMS,
    TEMPLATES,
    ToyWorldSpec,
    make_dataset,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Every placeholder is one word and every toy word one token; plus the start and end tokens.
LONGEST_CAPTION = max(len(template.split()) for template in TEMPLATES) + 2
MULTIPLE_OF_8 = "each must be a positive multiple of 8 (GroupNorm with 8 groups)"
# The fields that decide the networks' shapes: a resumed run must keep them, or its checkpoints do not load.
ARCHITECTURE = (
    "vae_channels",
    "unet_channels",
    "unet_attention_levels",
    "unet_layers_per_block",
    "unet_heads",
    "text_width",
    "text_layers",
    "max_length",
)
PROG = "rl-safety toyworld pretrain"
# What torch.load raises on a file it did not write: not a zip or pickle, truncated, or holding more than tensors.
TORCH_LOAD_ERRORS = (OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError)
# What a run leaves in output_dir (the rendered data cache aside, which is keyed by what made it).
RUN_FILES = ("config.json", "metrics.jsonl", "vae_checkpoint.pt", "unet_checkpoint.pt", "latents.pt", "pipeline")
# Real SD checkpoints name the text encoder's weights `text_model.…` (CLIPTextModel's own attribute). transformers 5
# saves them without it, and transformers 4 then loads none of them (random weights, only a warning).
TEXT_MODEL_PREFIX = "text_model."


def _field(default, help: str):
    """A config field with its command-line help text."""
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class PretrainConfig:
    output_dir: str = field(metadata={"help": "run folder: checkpoints, metrics.jsonl, config.json, pipeline/"})
    seed: int = _field(0, "seed of the data, the initialisation and every training batch")
    # data
    num_images: int = _field(65536, "images rendered once for both stages")
    data_cache: str = _field("", "where the rendered data set is cached (.pt); default <output_dir>/data.pt")
    exclude_colours: tuple[str, ...] = _field((), "colours left out of the training data entirely")
    # stage 1: VAE
    vae_steps: int = _field(1500, "VAE training steps")
    vae_batch_size: int = _field(32, "VAE batch size")
    vae_lr: float = _field(1e-3, "VAE peak learning rate (AdamW, warmup then cosine)")
    kl_weight: float = _field(1e-6, "weight of the KL term per latent element; small, as in SD's VAE")
    vae_channels: tuple[int, ...] = _field((32, 64), "VAE block widths; two blocks = 2x downsampling")
    # stage 2: UNet + text encoder
    unet_steps: int = _field(8000, "UNet + text encoder training steps")
    batch_size: int = _field(32, "UNet batch size")
    lr: float = _field(1e-3, "UNet + text encoder peak learning rate (AdamW, warmup, then cosine to a tenth)")
    weight_decay: float = _field(0.01, "AdamW weight decay (not on embeddings, norms, biases)")
    warmup_steps: int = _field(500, "linear learning-rate warmup steps")
    ema_decay: float = _field(0.999, "EMA decay of the exported UNet and text-encoder weights")
    caption_dropout: float = _field(0.1, "probability a caption is replaced by '' (the unconditional branch of CFG)")
    unet_channels: tuple[int, ...] = _field((32, 96), "UNet block widths (latent 16x16, then 8x8, ...)")
    unet_attention_levels: tuple[int, ...] = _field((1,), "UNet levels with cross-attention (0 = 16x16)")
    unet_layers_per_block: int = _field(1, "resnet layers per UNet block")
    unet_heads: int = _field(4, "attention heads in the UNet")
    text_width: int = _field(64, "text encoder width (= the UNet's cross-attention dim)")
    text_layers: int = _field(2, "text encoder layers")
    max_length: int = _field(16, "tokenizer/text-encoder length incl. bos/eos; the longest caption has 9 tokens")
    # bookkeeping
    save_every: int = _field(500, "steps between checkpoints and exports of the EMA pipeline")
    log_every: int = _field(100, "steps between lines in metrics.jsonl")
    resume: bool = _field(False, "continue from the checkpoints in output_dir")
    num_threads: int = _field(2, "torch CPU threads")

    def __post_init__(self) -> None:
        """Every field's type and range, so that bad input fails here and not in the middle of training."""
        self.exclude_colours = tuple(self.exclude_colours)
        self.vae_channels, self.unet_channels = tuple(self.vae_channels), tuple(self.unet_channels)
        self.unet_attention_levels = tuple(self.unet_attention_levels)
        unknown = sorted(set(self.exclude_colours) - set(COLOURS))
        attention_widths = [c for i, c in enumerate(self.unet_channels) if i in self.unet_attention_levels]
        check_seed(self.seed)
        check_fields(
            self,
            (str(self.output_dir).strip() != "", "output_dir", "must name a folder"),
            (self.num_images >= 1, "num_images", "must be ≥ 1"),
            (not unknown, "exclude_colours", f"unknown {unknown}; choose from {', '.join(COLOURS)}"),
            (len(set(self.exclude_colours)) < len(COLOURS), "exclude_colours", "must leave at least one colour"),
            (self.vae_steps >= 1, "vae_steps", "must be ≥ 1"),
            (self.vae_batch_size >= 1, "vae_batch_size", "must be ≥ 1"),
            (self.vae_lr > 0, "vae_lr", "must be > 0"),
            (self.kl_weight >= 0, "kl_weight", "must be ≥ 0"),
            (len(self.vae_channels) == 2, "vae_channels", "must have 2 entries: the latents are 2x downsampled"),
            (self.unet_steps >= 1, "unet_steps", "must be ≥ 1"),
            (self.batch_size >= 1, "batch_size", "must be ≥ 1"),
            (self.lr > 0, "lr", "must be > 0"),
            (self.weight_decay >= 0, "weight_decay", "must be ≥ 0"),
            (self.warmup_steps >= 0, "warmup_steps", "must be ≥ 0"),
            (0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)"),
            (0 <= self.caption_dropout <= 1, "caption_dropout", "must be in [0, 1]"),
            (all(c >= 8 and c % 8 == 0 for c in self.vae_channels), "vae_channels", MULTIPLE_OF_8),
            (all(c >= 8 and c % 8 == 0 for c in self.unet_channels), "unet_channels", MULTIPLE_OF_8),
            (
                set(self.unet_attention_levels) <= set(range(len(self.unet_channels))),
                "unet_attention_levels",
                f"must index unet_channels (0..{len(self.unet_channels) - 1})",
            ),
            (self.unet_layers_per_block >= 1, "unet_layers_per_block", "must be ≥ 1"),
            (self.unet_heads >= 1, "unet_heads", "must be ≥ 1"),
            (
                all(c >= self.unet_heads for c in attention_widths),
                "unet_heads",
                f"must be ≤ the width of every cross-attention level ({attention_widths})",
            ),
            (self.text_width >= 1, "text_width", "must be ≥ 1"),
            (
                self.text_width % max(1, self.text_width // 32) == 0,
                "text_width",
                f"must be a multiple of its {max(1, self.text_width // 32)} attention heads (one per 32 channels)",
            ),
            (self.text_layers >= 1, "text_layers", "must be ≥ 1"),
            (
                self.max_length >= LONGEST_CAPTION,
                "max_length",
                f"must be ≥ {LONGEST_CAPTION}, the tokens of the longest caption with its start and end tokens",
            ),
            (self.save_every >= 1, "save_every", "must be ≥ 1"),
            (self.log_every >= 1, "log_every", "must be ≥ 1"),
            (self.num_threads >= 1, "num_threads", "must be ≥ 1"),
        )


# ----------------------------------------------------------------------------------------------------------------
# components


def toy_words() -> list[str]:
    """Every word a toy-world caption can contain, plus the held-out synonyms (tokenized, never trained on)."""
    words = {w for t in TEMPLATES for w in re.sub(r"\{\w+\}", " ", t).split()}
    words |= set(COLOURS) | set(SHAPES) | set(SIZES) | set(BACKGROUNDS)
    words |= {w for syns in (*SYNONYMS.values(), *HELD_OUT_SYNONYMS.values()) for w in syns}
    return sorted(words)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merge `symbols` with merge ranks `ranks`, as the BPE model does (lowest rank first)."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, math.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        pair, merged, j = (symbols[i], symbols[i + 1]), [], 0
        while j < len(symbols):  # merge every occurrence of the pair, left to right
            if j < len(symbols) - 1 and (symbols[j], symbols[j + 1]) == pair:
                merged.append(symbols[j] + symbols[j + 1])
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols


def build_tokenizer(words: list[str], max_length: int = 16) -> CLIPTokenizer:
    """A CLIPTokenizer where each of `words` is one token; other text falls back to byte-level characters."""
    alphabet = byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not word.isascii() or not word.isalpha() or word != word.lower():
            raise ValueError(f"{word!r}: toy words must be lowercase ASCII letters (CLIP lowercases text)")
        symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        # Merges appended after the existing ones never change how earlier words split (those are single tokens).
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            symbols = _bpe(symbols, ranks)
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=EOS)


def build_components(config: PretrainConfig):
    """Freshly initialised (tokenizer, text_encoder, vae, unet, scheduler) for `config`."""
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(toy_words(), config.max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_width,
            intermediate_size=2 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=max(1, config.text_width // 32),
            max_position_embeddings=config.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=ToyWorldSpec().resolution,
    )
    levels, attention = len(config.unet_channels), config.unet_attention_levels
    unet = UNet2DConditionModel(
        sample_size=ToyWorldSpec().resolution // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=tuple(f"{'CrossAttn' if i in attention else ''}DownBlock2D" for i in range(levels)),
        up_block_types=tuple(f"{'CrossAttn' if i in attention else ''}UpBlock2D" for i in reversed(range(levels))),
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers_per_block,
        cross_attention_dim=config.text_width,
        attention_head_dim=config.unet_heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=8,
    )
    return tokenizer, text_encoder, vae, unet, DDIMScheduler(**SD_SCHEDULER_CONFIG)


def num_params(module: torch.nn.Module) -> int:
    """Number of parameters of `module`."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# data and checkpoints


def data_cache_path(config: PretrainConfig) -> Path:
    """Where the rendered data set is cached: `data_cache`, or `<output_dir>/data.pt`."""
    return Path(config.data_cache or Path(config.output_dir) / "data.pt")


def load_data(config: PretrainConfig) -> dict:
    """The rendered training set (uint8 images, captions, labels), from the cache or rendered once and cached. A
    cache that does not load, or was made by other settings, is a `ConfigError` naming it."""
    path = data_cache_path(config)
    key = {"num_images": config.num_images, "seed": config.seed, "exclude_colours": list(config.exclude_colours)}
    if path.exists():
        try:
            data = torch.load(path, weights_only=True)
        except TORCH_LOAD_ERRORS as err:
            raise load_error("data_cache", str(path), err) from err
        if not isinstance(data, dict) or "key" not in data:
            raise ConfigError(f"data_cache={str(path)!r}: not a data set written by this command; pass another")
        if data["key"] == key:
            return data
        raise ConfigError(
            f"data_cache={str(path)!r}: holds a data set made with {data['key']}, not {key}; pass another --data_cache"
        )
    data = make_dataset(config.num_images, seed=config.seed, exclude_colours=config.exclude_colours)
    data["images"] = (data["images"] * 255).round().to(torch.uint8)  # 4x smaller; the renderer is smooth anyway
    data["key"] = key
    atomic_save(data, path)
    return data


def atomic_save(obj, path: Path) -> None:
    """`torch.save` to a temp file beside `path`, then rename: an interrupted save never leaves a broken file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_lambda(warmup: int, total: int):
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def progress(total: int, initial: int, desc: str) -> tqdm:
    """A tqdm bar; redraws rarely when stderr is a log file rather than a terminal."""
    return tqdm(total=total, initial=initial, desc=desc, mininterval=0.5 if sys.stderr.isatty() else 30)


# ----------------------------------------------------------------------------------------------------------------
# stage 1: VAE


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, generator: torch.Generator):
    """(loss, reconstruction term, KL per latent element) for images `x` in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    recon = vae.decode(z).sample
    rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)  # L1 keeps edges sharp, MSE the colours exact
    kl = posterior.kl().mean() / z[0].numel()
    return rec + kl_weight * kl, rec, kl


def train_vae(vae: AutoencoderKL, images: torch.Tensor, config: PretrainConfig, checkpoint: Path) -> AutoencoderKL:
    """Train the autoencoder on uint8 `images` (N, 3, H, W), resuming from `checkpoint` if it exists."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    warmup = min(200, config.vae_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, config.vae_steps))
    step = load_checkpoint(checkpoint, vae, optimizer, schedule)
    vae.train()
    bar = progress(config.vae_steps, step, "vae")
    while step < config.vae_steps:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # exact resume: seeded per step
        index = torch.randint(len(images), (config.vae_batch_size,), generator=generator)
        loss, rec, kl = vae_loss(vae, images[index].float() / 127.5 - 1, config.kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        bar.update()
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.1f}", refresh=False)
        if step % config.log_every == 0 or step == config.vae_steps:
            log_metrics(config, stage="vae", step=step, rec=round(rec.item(), 5), kl=round(kl.item(), 3))
        if step % config.save_every == 0 or step == config.vae_steps:
            save_checkpoint(checkpoint, step, vae, optimizer, schedule)
    bar.close()
    return vae.eval()


def save_checkpoint(path: Path, step: int, model: torch.nn.Module, optimizer, schedule, ema=None) -> None:
    """Everything needed to continue training exactly (batches are seeded by step, so no RNG state is needed)."""
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    state["schedule"] = schedule.state_dict()
    if ema is not None:
        state["ema"] = ema.state_dict()
    atomic_save(state, path)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, schedule, ema=None) -> int:
    """Restore a `save_checkpoint` file if it exists; returns the step to continue from (0 without one)."""
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return state["step"]


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, ...]:
    """Posterior mean and std (float16) of every image: the UNet stage samples latents from them, never re-encoding."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="encode", mininterval=30):
        posterior = vae.encode(images[start : start + batch_size].float() / 127.5 - 1).latent_dist
        means.append(posterior.mean.half())
        stds.append(posterior.std.half())
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------------------------------------------
# stage 2: UNet + text encoder


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·params, in place."""
    torch._foreach_lerp_(ema, params, 1 - decay)


def denoising_loss(unet, text_encoder, z: torch.Tensor, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps of the SD 1.x noise schedule."""
    alphas = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod
    noise = torch.randn(z.shape, generator=generator)
    t = torch.randint(len(alphas), (len(z),), generator=generator)
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * z + (1 - a).sqrt() * noise
    return F.mse_loss(unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample, noise)


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    input_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    scaling_factor: float,
    config: PretrainConfig,
    checkpoint: Path,
    export: Callable[[UNet2DConditionModel, CLIPTextModel, int], None] | None = None,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Train the UNet and text encoder jointly (in place), resuming from `checkpoint`; return their EMA copies.

    `latents` is the VAE posterior (mean, std) per image, `input_ids` (N, L) the tokenized captions, `empty_ids`
    (L,) the empty caption; `export(ema_unet, ema_text_encoder, step)` is called after every checkpoint.
    """
    modules = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = copy.deepcopy(modules).requires_grad_(False)
    # No weight decay on embeddings, norms and biases: unseen tokens (held-out synonyms) keep their initial vectors.
    decayed = {n for n, p in modules.named_parameters() if p.ndim >= 2 and "embedding" not in n}
    groups = [
        {"params": [p for n, p in modules.named_parameters() if n in decayed], "weight_decay": config.weight_decay},
        {"params": [p for n, p in modules.named_parameters() if n not in decayed], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.unet_steps))
    step = load_checkpoint(checkpoint, modules, optimizer, schedule, ema)
    params, ema_params = list(modules.parameters()), list(ema.parameters())
    mean, std = latents
    modules.train()
    bar = progress(config.unet_steps, step, "unet")
    last_time, last_step, smooth = time.time(), step, None
    while step < config.unet_steps:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 500_009 + step)
        index = torch.randint(len(mean), (config.batch_size,), generator=generator)
        m, s = mean[index].float(), std[index].float()
        z = (m + s * torch.randn(m.shape, generator=generator)) * scaling_factor
        drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None], input_ids[index])
        loss = denoising_loss(unet, text_encoder, z, ids, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        # EMA warms up (decay grows from 0) so early exports are not dominated by the random initialisation.
        ema_update(ema_params, params, min(config.ema_decay, (1 + step) / (10 + step)))
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.update()
        bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{schedule.get_last_lr()[0]:.1e}", refresh=False)
        if step % config.log_every == 0 or step == config.unet_steps:
            seconds = (time.time() - last_time) / (step - last_step)
            last_time, last_step = time.time(), step
            lr = float(f"{schedule.get_last_lr()[0]:.3g}")
            log_metrics(config, stage="unet", step=step, loss=round(smooth, 5), lr=lr, s_per_step=round(seconds, 3))
        if step % config.save_every == 0 or step == config.unet_steps:
            save_checkpoint(checkpoint, step, modules, optimizer, schedule, ema)
            if export is not None:
                export(ema["unet"], ema["text_encoder"], step)
    bar.close()
    return ema["unet"].eval(), ema["text_encoder"].eval()


# ----------------------------------------------------------------------------------------------------------------
# output


def save_pipeline(path: str | Path, tokenizer, text_encoder, vae, unet, scheduler) -> Path:
    """Write the components as a diffusers folder (safetensors); built in a temp dir, then swapped in by rename."""
    path = Path(path)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with atomic_folder(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_portable_layout(tmp)
    return path


def prefix_text_encoder_weights(folder: str | Path) -> bool:
    """Rename the weights in `folder/model.safetensors` to `text_model.…` (the layout of SD checkpoints on the Hub,
    which transformers 4 and 5 both load); the tensors are unchanged. Returns whether the file was rewritten."""
    path = Path(folder) / "model.safetensors"
    state = load_file(str(path))
    if all(key.startswith(TEXT_MODEL_PREFIX) for key in state):
        return False
    state = {key if key.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + key: t for key, t in state.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({key: state[key] for key in sorted(state)}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return True


def write_slow_tokenizer_files(folder: str | Path) -> None:
    """Write `vocab.json`, `merges.txt` and `special_tokens_map.json` beside `tokenizer.json`: the files the
    Python `CLIPTokenizer` (transformers 4's, what diffusers loads there) reads. Same BPE, so the same ids."""
    folder = Path(folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{folder}: expected a BPE tokenizer.json, got {model.get('type')!r}")
    vocab = dict(model["vocab"])
    for token in spec.get("added_tokens", []):
        vocab.setdefault(token["content"], token["id"])
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    if any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{folder}: a merge holds a space, which merges.txt cannot write")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config}
    files = {
        "vocab.json": json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), indent=2, ensure_ascii=False),
        "merges.txt": "\n".join(["#version: 0.2", *merges]),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
    for name, text in files.items():
        (folder / name).write_text(text + "\n", encoding="utf-8")


def write_portable_layout(pipeline: str | Path) -> None:
    """Make a saved pipeline folder load the same under transformers 4 and 5: `text_model.`-prefixed text-encoder
    weights and the slow tokenizer's files (see the two functions above)."""
    pipeline = Path(pipeline)
    prefix_text_encoder_weights(pipeline / "text_encoder")
    write_slow_tokenizer_files(pipeline / "tokenizer")


def log_metrics(config: PretrainConfig, **metrics) -> None:
    """Append one JSON line to <output_dir>/metrics.jsonl and echo it above the progress bar."""
    line = json.dumps({"time": round(time.time(), 1), **metrics})
    with open(Path(config.output_dir) / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
    tqdm.write(line)


def folder_mb(path: Path) -> float:
    """Total size of the files under `path` in MB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


# ----------------------------------------------------------------------------------------------------------------
# entry point


def check_run_folder(config: PretrainConfig) -> None:
    """Before any work: `output_dir` is a folder that can be written, holds no run unless `--resume`, and a resumed
    run has the same architecture and checkpoints that load; the data cache is a file. A `ConfigError` otherwise."""
    out = Path(config.output_dir)
    cache = data_cache_path(config)
    try:
        check_output_folder(out)
        if cache.exists() and not cache.is_file():
            raise ValueError(f"data_cache={str(cache)!r}: is a folder, not a file")
        check_output_folder(cache.parent, "data_cache's folder")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not config.resume:
        raise ConfigError(
            f"output_dir={config.output_dir!r}: holds a run ({', '.join(found)}); pass --resume to continue it, "
            "or choose another output_dir"
        )
    if not config.resume:
        return
    saved = out / "config.json"
    if saved.is_file():
        try:
            previous = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"--resume: {str(saved)!r} does not load as JSON ({first_line(err)})") from err
        current = json.loads(json.dumps(asdict(config)))
        if not isinstance(previous, dict):
            raise ConfigError(f"--resume: {str(saved)!r} holds no config (a JSON object); choose another output_dir")
        changed = [name for name in ARCHITECTURE if name in previous and previous[name] != current[name]]
        if changed:
            values = ", ".join(f"{name}={current[name]} (the run's: {previous[name]})" for name in changed)
            raise ConfigError(
                f"--resume: {values}; a resumed run keeps the architecture of its checkpoints: give the run's values "
                "or choose another output_dir"
            )
    for name in ("vae_checkpoint.pt", "unet_checkpoint.pt"):
        path = out / name
        if path.exists():
            try:
                state = torch.load(path, weights_only=True, mmap=True)
            except TORCH_LOAD_ERRORS as err:
                raise ConfigError(f"--resume: checkpoint {str(path)!r} does not load ({first_line(err)})") from err
            if not isinstance(state, dict) or not {"step", "model", "optimizer", "schedule"} <= set(state):
                raise ConfigError(f"--resume: {str(path)!r} is not a checkpoint written by this command")


def pretrain(config: PretrainConfig) -> Path:
    """Run both stages (resuming where checkpoints exist) and export the pipeline; returns its folder. Everything is
    checked (`check_run_folder`, the data cache) before `output_dir` is written to."""
    check_run_folder(config)
    previous = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return _pretrain(config)
    finally:
        torch.set_num_threads(previous)  # the caller's process (a notebook, a test worker) keeps its own setting


def _pretrain(config: PretrainConfig) -> Path:
    out = Path(config.output_dir)
    vae_ckpt, unet_ckpt = out / "vae_checkpoint.pt", out / "unet_checkpoint.pt"

    tokenizer, text_encoder, vae, unet, scheduler = build_components(config)
    sizes = {name: num_params(m) for name, m in [("text_encoder", text_encoder), ("vae", vae), ("unet", unet)]}
    data = load_data(config)
    images = data["images"]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(asdict(config), indent=2))
    tqdm.write(f"parameters: {sizes}")

    t0 = time.time()
    vae = train_vae(vae, images, config, vae_ckpt)
    latents_path = out / "latents.pt"
    cached = torch.load(latents_path, weights_only=True) if latents_path.exists() else {}
    if cached.get("vae_steps") != config.vae_steps:  # encode once per VAE; the UNet stage then never re-encodes
        latents = encode_latents(vae, images)
        mean, std = latents[0][:4096].float(), latents[1][:4096].float()
        sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(config.seed))
        # As in SD: scale latents to unit variance, which the noise schedule assumes.
        cached = {"latents": latents, "scaling_factor": 1.0 / sample.std().item(), "vae_steps": config.vae_steps}
        atomic_save(cached, latents_path)
    latents, scaling_factor = cached["latents"], cached["scaling_factor"]
    vae.register_to_config(scaling_factor=scaling_factor)
    log_metrics(config, stage="vae_done", seconds=round(time.time() - t0, 1), scaling_factor=scaling_factor)

    encode = dict(padding="max_length", max_length=config.max_length, truncation=True, return_tensors="pt")
    input_ids = tokenizer(data["captions"], **encode).input_ids
    empty_ids = tokenizer([""], **encode).input_ids[0]

    def export(ema_unet, ema_text, step: int) -> None:
        save_pipeline(out / "pipeline", tokenizer, ema_text, vae, ema_unet, scheduler)

    t0 = time.time()
    unet, text_encoder = train_unet(
        unet, text_encoder, latents, input_ids, empty_ids, scaling_factor, config, unet_ckpt, export
    )
    path = save_pipeline(out / "pipeline", tokenizer, text_encoder, vae, unet, scheduler)
    log_metrics(config, stage="done", unet_seconds=round(time.time() - t0, 1), pipeline_mb=round(folder_mb(path), 2))
    return path


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    """Command-line flags, one per `PretrainConfig` field; bad input is a `ConfigError`."""
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    for f in fields(PretrainConfig):
        name = f"--{f.name}"
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        kwargs = {"help": f.metadata["help"]}
        if default is MISSING:
            parser.add_argument(name, required=True, **kwargs)
        elif isinstance(default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, **kwargs)
        elif isinstance(default, tuple):
            item = str if f.name == "exclude_colours" else int
            parser.add_argument(name, nargs="*" if item is str else "+", type=item, default=default, **kwargs)
        else:
            parser.add_argument(name, type=type(default), default=default, **kwargs)
    args = parser.parse_args(argv)
    try:
        return PretrainConfig(**vars(args))
    except ConfigError:
        raise
    except ValueError as err:  # the config's own checks (`__post_init__`)
        raise ConfigError(str(err)) from err


def main(argv: list[str] | None = None) -> int:
    """`rl-safety toyworld pretrain ...`: train and export the toy-world pipeline."""
    path = pretrain(parse_args(argv))
    print(f"pipeline written to {path}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`main` with bad input as one line on stderr and exit status 2, Ctrl-C as one line (see `command.py`)."""
    hint = "add --resume to the same command to continue from the last checkpoint"
    return run_command(PROG, main, argv, resume_hint=hint)


if __name__ == "__main__":
    sys.exit(cli())
