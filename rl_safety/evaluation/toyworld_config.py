"""Configuration of `rl-safety eval`: which models, which prompts and seeds, which judges."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import check_device, check_fields, check_seeds
from ..toyworld import ASSETS
from .baselines import BASELINES, SLD_PRESETS


@dataclass
class ToyWorldEvalConfig:
    """Erasure evaluation in the toy world. Rates come from judges independent of every training reward."""

    pretrained_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The base pipeline (a diffusers folder). Default: the shipped toy pipeline."}
    )
    adapter: list[str] = field(
        default_factory=list,
        metadata={
            "help": "LoRA adapter folders (each holding pytorch_lora_weights.safetensors), evaluated beside base."
        },
    )
    target_concept: str = field(default="red", metadata={"help": "The erased concept: a toy-world colour or shape."})
    unsafe_prompts: str = field(
        default="prompts/toyworld/{target_concept}/unsafe.txt",
        metadata={"help": "Prompts naming the concept: target_rate is measured on them."},
    )
    implicit_prompts: str = field(
        default="prompts/toyworld/{target_concept}/implicit.txt",
        metadata={"help": "Prompts naming the concept by a synonym never trained on: synonym_target_rate."},
    )
    safe_prompts: str = field(
        default="prompts/toyworld/{target_concept}/safe.txt",
        metadata={"help": "Prompts not naming the concept: preservation_accuracy and clip_score."},
    )
    seeds: list[int] = field(
        default_factory=lambda: [1000, 1001],
        metadata={"help": "Each prompt is sampled once per seed; the same initial noise for every model."},
    )
    num_inference_steps: int = field(default=20, metadata={"help": "DDIM steps."})
    guidance_scale: float = field(default=4.0, metadata={"help": "Classifier-free guidance scale."})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta (0: deterministic given the initial noise)."})
    batch_size: int = field(default=256, metadata={"help": "Images per pipeline call."})
    judge_classifier: str | None = field(
        default=None,
        metadata={
            "help": "Shape judge: a classifier trained apart from the reward's (colour is judged from pixels). "
            "Default: the shipped judge."
        },
    )
    reward_classifier: str | None = field(
        default=None,
        metadata={
            "help": "The training reward's classifier; its rates are reported beside the judge's. Default: the "
            "shipped one."
        },
    )
    clip_model: str | None = field(
        default=None, metadata={"help": "An open_clip model folder, for clip_score. Default: the shipped toy CLIP."}
    )
    baselines: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Sampling-time baselines evaluated beside base and the adapters: 'negative_prompt' (the concept "
            "as negative prompt) and 'sld' (Safe Latent Diffusion steering away from the concept)."
        },
    )
    sld_preset: str = field(
        default="medium", metadata={"help": "SLD configuration: weak, medium, strong or max (the SLD paper's)."}
    )
    device: str | None = field(default=None, metadata={"help": "Torch device. Default: cuda if available, else cpu."})
    grid_prompts: int = field(default=8, metadata={"help": "Prompts per set shown in the report's image grids."})
    output_dir: str = field(default="runs/toyworld-eval", metadata={"help": "Where report.json and report.html go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow replacing an output_dir that already holds a report."}
    )

    def __post_init__(self):
        shipped = {
            "pretrained_model_name_or_path": "pipeline",
            "judge_classifier": "judge_classifier",
            "reward_classifier": "reward_classifier",
            "clip_model": "clip",
        }
        for name, folder in shipped.items():
            if getattr(self, name) is None:
                setattr(self, name, str(ASSETS / folder))
        checks = [
            (self.num_inference_steps >= 1, "num_inference_steps", "must be ≥ 1"),
            (self.batch_size >= 1, "batch_size", "must be ≥ 1"),
            (self.eta >= 0, "eta", "must be ≥ 0"),
            (self.guidance_scale >= 1, "guidance_scale", "must be ≥ 1 (1: no classifier-free guidance)"),
            (self.grid_prompts >= 1, "grid_prompts", "must be ≥ 1"),
            (all(b in BASELINES for b in self.baselines), "baselines", f"each must be one of {', '.join(BASELINES)}"),
            (self.sld_preset in SLD_PRESETS, "sld_preset", f"must be one of {', '.join(SLD_PRESETS)}"),
        ]
        check_fields(self, *checks)
        check_seeds(self.seeds)
        check_device(self.device)
