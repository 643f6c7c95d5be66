"""Stable Diffusion components: loading, the LoRA adapter (attach / save / load), and cached prompt encoding."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from .errors import first_line
from .model_config import ModelArguments

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """`ModelArguments.torch_dtype` to a torch dtype ("auto" → float32 for training stability on CPU)."""
    if name == "auto":
        return torch.float32
    return DTYPES[name]


def load_pipeline(model_args: ModelArguments) -> StableDiffusionPipeline:
    """Load any diffusers SD 1.x/2.x checkpoint (hub id or local directory) with a DDIM scheduler.

    The frozen parts (VAE, text encoder, base UNet weights) are cast to `torch_dtype`; LoRA weights stay float32.
    """
    dtype = resolve_dtype(model_args.torch_dtype)
    problem = pipeline_folder_problem(model_args.pretrained_model_name_or_path)
    if problem:
        raise OSError(problem)
    pipe = StableDiffusionPipeline.from_pretrained(
        model_args.pretrained_model_name_or_path,
        revision=model_args.revision,
        variant=model_args.variant,
        dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_folder_problem(directory: str | Path) -> str | None:
    """Why a local pipeline folder would fail to load (no or unreadable model_index.json, a component's weights
    not readable safetensors), or None; a Hub id is not checked. Read from the files' headers only, so a broken
    model is reported in one line before the loading bars start."""
    root = Path(directory)
    if not root.is_dir():
        return None
    index = root / "model_index.json"
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no model_index.json in that folder (not a diffusers pipeline)"
    except (OSError, ValueError) as err:
        return f"model_index.json does not parse ({first_line(err)})"
    if not isinstance(components, dict):
        return "model_index.json is not a JSON object"
    for name, spec in components.items():
        if name.startswith("_") or not (root / name).is_dir() or not isinstance(spec, list) or None in spec:
            continue
        for weights in sorted((root / name).glob("*.safetensors")):
            try:
                with safe_open(str(weights), "pt"):
                    pass
            except Exception as err:  # safetensors raises its own error types for truncated or foreign files
                return f"{name}/{weights.name} is not a readable safetensors file ({first_line(err)})"
    return None


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, target_modules: str | Sequence[str], seed: int) -> None:
    """Attach a trainable LoRA adapter; a fresh one is a no-op (its B matrices start at zero).

    `target_modules`: module-name suffixes, or one string = a regex the full module name must match (peft)."""
    torch.manual_seed(seed)  # the A matrices' initialisation is part of the run's reproducibility
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    try:
        unet.add_adapter(config)
    except ValueError as err:  # peft's NoMatchingPeftModuleError and friends: say what would match
        if "not found" not in str(err) and "match" not in str(err):
            raise
        raise ValueError(_no_match(target_modules, unet)) from err
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def unmatched_lora_targets(model_args: ModelArguments, targets: str | Sequence[str]) -> str | None:
    """Why `targets` match no module of the checkpoint's UNet (read from its config, no weights loaded), or None.

    peft's rule: a list entry matches a module whose name equals it or ends with "." + it; one string is a regex the
    full name must match. A checkpoint whose config cannot be read here is left to the loader's own error."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    if not Path(model_args.pretrained_model_name_or_path or "").is_dir():
        return None  # a Hub checkpoint: reading its config would need the network before the loader does
    try:
        config = UNet2DConditionModel.load_config(model_args.pretrained_model_name_or_path, subfolder="unet")
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(config)
    except (OSError, ValueError):
        return None
    names = [name for name, _ in unet.named_modules()]
    if isinstance(targets, str):
        found = any(re.fullmatch(targets, name) for name in names)
    else:
        found = any(name == t or name.endswith("." + t) for name in names for t in targets)
    if found:
        return None
    return _no_match(targets, unet)


def _no_match(targets: str | Sequence[str], unet: torch.nn.Module) -> str:
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in unet.named_modules() if isinstance(m, layers)})
    names = ", ".join(leaves)
    return f"lora_target_modules={targets!r}: no module of the UNet matches; its Linear/Conv2d names: {names}"


def lora_state_dict(unet: torch.nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's key names (`lora_A` / `lora_B`), which `load_lora_weights` reads as they are.

    Not diffusers' older names: `convert_state_dict_to_diffusers` renames only the attention projections, and a
    dict that mixes both styles (an adapter on convolutions or feed-forwards as well, e.g. ESD-u) is read by
    `load_lora_weights` in the style of its first key, silently dropping the others.
    `state_dict` is the full (gathered) model state under FSDP / DeepSpeed, where the module's own is sharded."""
    return get_peft_model_state_dict(unet, state_dict=state_dict)


def save_lora(unet: torch.nn.Module, output_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` (diffusers format, with the LoRA config as metadata) atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metadata = unet.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=lora_state_dict(unet, state_dict),
            safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )
        os.replace(Path(tmp) / LORA_WEIGHT_NAME, output_dir / LORA_WEIGHT_NAME)
    return output_dir / LORA_WEIGHT_NAME


def lora_file_problem(directory: str | Path) -> str | None:
    """Why `directory` does not hold a readable LoRA adapter (missing, not safetensors, no LoRA tensors), or None.
    Checked before any work starts, so a bad adapter fails in one line instead of after the base model's samples."""
    path = Path(directory) / LORA_WEIGHT_NAME
    if not path.is_file():
        return f"no {LORA_WEIGHT_NAME} in that folder"
    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        return f"{LORA_WEIGHT_NAME} is not a readable safetensors file ({type(err).__name__})"
    if not any("lora" in key for key in keys):
        return f"{LORA_WEIGHT_NAME} holds no LoRA tensors (keys such as {keys[:2]})"
    return None


def load_lora_into(unet: torch.nn.Module, directory: str | Path) -> None:
    """Load adapter weights saved by `save_lora` into a UNet that already carries an adapter of the same shape."""
    path = Path(directory) / LORA_WEIGHT_NAME
    state = load_file(path)
    state = {k.removeprefix("unet."): v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    if result is not None and getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: keys not in the adapter: {result.unexpected_keys[:3]}...")


class PromptEncoder:
    """Text-encoder embeddings, computed once per distinct prompt: the encoder is frozen, so they never change."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, max_cache: int = 4096):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_cache = max_cache
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), seq, dim) embeddings; unseen prompts are encoded in one batch."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if missing:
            if len(self.cache) + len(missing) > self.max_cache:
                self.cache.clear()
            self.cache.update(zip(missing, self._encode(missing)))
        return torch.stack([self.cache[p] for p in prompts])


@contextlib.contextmanager
def adapters_disabled(unet: torch.nn.Module):
    """The base model = the UNet with its LoRA adapter(s) switched off (no second UNet in memory)."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def load_adapter(pipe: StableDiffusionPipeline, adapter: str, adapter_name: str) -> None:
    """Load a LoRA folder into `pipe` as the only active adapter; a file that does not load is a `ConfigError`."""
    from diffusers.utils import logging as diffusers_logging

    from .command import load_error

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder": expected for UNet-only adapters
    try:
        pipe.load_lora_weights(adapter, adapter_name=adapter_name)
    except (OSError, ValueError, RuntimeError) as err:
        raise load_error("adapter", adapter, err) from err
    finally:
        diffusers_logging.set_verbosity(verbosity)
    # Required: a newly loaded adapter inherits the active set, which delete_adapters may have left empty.
    pipe.set_adapters([adapter_name])
