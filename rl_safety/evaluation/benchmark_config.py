"""Configuration of a real-model benchmark (`rl-safety eval` with a recipe that lists `metrics`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..checks import check_device, check_fields, check_seeds
from ..model_config import TORCH_DTYPES
from .baselines import BASELINES, SLD_PRESETS

PROMPT_SOURCES = ("i2p", "captions", "file")
# The nudity recipes' concept. SLD's own default (`StableDiffusionPipelineSafe.safety_concept`) names 20 kinds of
# inappropriate content; set `baseline_concept` to it for an I2P-wide benchmark.
DEFAULT_BASELINE_CONCEPT = "nudity, nude, naked, sexual, explicit"


@dataclass
class BenchmarkConfig:
    """A prompt set sampled by the base model and every adapter from the same noise, measured by `metrics`."""

    pretrained_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Any SD 1.x/2.x diffusers checkpoint: a Hub id or a local folder."}
    )
    metrics: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "Metrics as {name, args, alias} entries, e.g. {name: nudity, args: {preset: i2p}}."},
    )
    adapter: list[str] = field(
        default_factory=list, metadata={"help": "LoRA adapter folders evaluated beside the base model."}
    )
    baselines: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Sampling-time baselines on the base model, reported right after it: 'negative_prompt' "
            "(baseline_concept as negative prompt) and 'sld' (Safe Latent Diffusion, baseline_concept as its safety "
            "concept)."
        },
    )
    baseline_concept: str = field(
        default=DEFAULT_BASELINE_CONCEPT,
        metadata={"help": "The baselines' negative prompt / SLD safety concept."},
    )
    sld_preset: str = field(
        default="medium", metadata={"help": "SLD configuration: weak, medium, strong or max (the SLD paper's)."}
    )
    checkpoints: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Other SD checkpoints (Hub ids or diffusers folders, e.g. published ESD/UCE/MACE models) sampled "
            "from the same prompts, seeds and noise; named by their folder or repository name."
        },
    )
    attack: str | None = field(
        default=None,
        metadata={
            "help": "An attack recipe (e.g. recipes/sd14/attack_nudity.yaml) run on base and the adapters with this "
            "benchmark's model and device, into OUTPUT_DIR/attack; adds attack_success_rate and attack_clean_rate."
        },
    )
    prompt_source: str = field(
        default="i2p",
        metadata={
            "help": "How `prompts` is read: 'i2p' (I2P's CSV or datasets id, filtered by categories), 'captions' "
            "(a caption file or datasets id, e.g. COCO), 'file' (a .txt prompt file).",
            "choices": list(PROMPT_SOURCES),
        },
    )
    prompts: str = field(default="AIML-TUDA/i2p", metadata={"help": "The prompt file or datasets id."})
    categories: list[str] = field(
        default_factory=lambda: ["sexual"], metadata={"help": "I2P categories to keep (prompt_source: i2p)."}
    )
    hard_only: bool = field(default=False, metadata={"help": "Only I2P's `hard` prompts (prompt_source: i2p)."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use the first N prompts (sampled for captions)."})
    prompt_seed: int = field(default=0, metadata={"help": "Seed of the caption sample (prompt_source: captions)."})
    seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Each prompt is sampled once per seed, from the same noise for every model."},
    )
    num_inference_steps: int = field(default=50, metadata={"help": "DDIM steps."})
    guidance_scale: float = field(default=7.5, metadata={"help": "Classifier-free guidance scale."})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta (0: deterministic)."})
    batch_size: int = field(default=8, metadata={"help": "Images per pipeline call."})
    torch_dtype: str = field(default="auto", metadata={"help": "Dtype of the pipeline's weights."})
    device: str | None = field(default=None, metadata={"help": "Torch device. Default: cuda if available, else cpu."})
    grid_prompts: int = field(default=8, metadata={"help": "Prompts (evenly spread) shown in report.html's grids."})
    output_dir: str = field(
        default="runs/benchmark", metadata={"help": "Where report.json, report.html and the image cache go."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow replacing an output_dir that already holds a report."}
    )

    def __post_init__(self):
        checks = [
            (bool(self.pretrained_model_name_or_path), "pretrained_model_name_or_path", "must name a diffusers model"),
            (self.prompt_source in PROMPT_SOURCES, "prompt_source", f"must be one of {', '.join(PROMPT_SOURCES)}"),
            (bool(self.metrics), "metrics", "must list at least one {name, args} entry"),
            (self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be ≥ 1"),
            (self.num_inference_steps >= 1, "num_inference_steps", "must be ≥ 1"),
            (self.guidance_scale >= 1, "guidance_scale", "must be ≥ 1 (1: no classifier-free guidance)"),
            (self.eta >= 0, "eta", "must be ≥ 0"),
            (self.batch_size >= 1, "batch_size", "must be ≥ 1"),
            (self.torch_dtype in TORCH_DTYPES, "torch_dtype", f"must be one of {', '.join(TORCH_DTYPES)}"),
            (all(b in BASELINES for b in self.baselines), "baselines", f"each must be one of {', '.join(BASELINES)}"),
            (len(set(self.baselines)) == len(self.baselines), "baselines", "lists a baseline twice"),
            (self.sld_preset in SLD_PRESETS, "sld_preset", f"must be one of {', '.join(SLD_PRESETS)}"),
            (bool(self.baseline_concept.strip()), "baseline_concept", "must name the concept (a phrase)"),
            (self.attack is None or bool(self.attack.strip()), "attack", "must be an attack recipe path"),
            (self.grid_prompts >= 1, "grid_prompts", "must be ≥ 1"),
        ]
        check_fields(self, *checks)
        for i, entry in enumerate(self.metrics):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ValueError(f"metrics[{i}]={entry!r}: must be a mapping with a 'name' (and optional 'args')")
            unknown = set(entry) - {"name", "args", "alias"}
            if unknown:
                raise ValueError(f"metrics[{i}]: unknown keys {sorted(unknown)}; valid keys: name, args, alias")
        keys = [entry.get("alias", entry["name"]) for entry in self.metrics]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"metrics: {repeated[0]!r} appears twice; give one of them an 'alias'")
        check_seeds(self.seeds)
        check_device(self.device)
