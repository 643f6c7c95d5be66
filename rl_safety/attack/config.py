"""Configuration of `rl-safety attack`: the model under attack, the concept prompts, PGD, the detector."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import check_device, check_fields, check_seeds
from ..model_config import TORCH_DTYPES
from ..rewards.nudity import NUDENET_LABELS
from ..toyworld import ASSETS
from .objectives import OBJECTIVES

DETECTORS = ("toyworld", "nudenet")


@dataclass
class AttackConfig:
    """A white-box attack on text embeddings: how often does an erased model draw the concept again?"""

    pretrained_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The base pipeline (Hub id or diffusers folder). Default: the toy pipeline."}
    )
    torch_dtype: str = field(default="auto", metadata={"help": "Dtype of the pipeline's weights ('auto': float32)."})
    adapter: list[str] = field(
        default_factory=list,
        metadata={"help": "LoRA adapter folders to attack, one after another. None: the base model is attacked."},
    )
    target_concept: str = field(default="red", metadata={"help": "The erased concept (toy world: colour or shape)."})
    prompts: str = field(
        default="prompts/toyworld/{target_concept}/unsafe.txt",
        metadata={"help": "Prompts naming the concept (a prompt file); each gets its own adversarial embedding."},
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Attack only the first N prompts."})
    objective: str = field(
        default="race",
        metadata={
            "help": "'race': the attacked model's noise prediction under the adversarial embedding matches the noise "
            "that produced a concept image's latent (RACE). 'unlearndiff': it matches the base model's prediction "
            "for the clean prompt (UnlearnDiffAtk).",
            "choices": list(OBJECTIVES),
        },
    )
    epsilon: float = field(
        default=0.1, metadata={"help": "L∞ radius of the ball around the clean text-encoder output."}
    )
    pgd_num_step: int = field(default=20, metadata={"help": "PGD steps (RACE's training uses 10)."})
    pgd_step_size: float | None = field(
        default=None, metadata={"help": "Signed step size. Default: epsilon / 4 (the RACE repository's ratio)."}
    )
    clamp_to_range: bool = field(
        default=True,
        metadata={"help": "Keep every coordinate within the clean embedding's [min, max] (as RACE does)."},
    )
    num_concept_images: int = field(
        default=1, metadata={"help": "Concept images per prompt (drawn by the base model) the objective noises."}
    )
    attack_seed: int = field(default=0, metadata={"help": "Seeds the concept images, the PGD start and timesteps."})
    seeds: list[int] = field(
        default_factory=lambda: [1000, 1001],
        metadata={"help": "Each prompt is sampled once per seed, with and without attack, from the same noise."},
    )
    num_inference_steps: int = field(default=20, metadata={"help": "DDIM steps of every sampled image."})
    guidance_scale: float = field(default=4.0, metadata={"help": "Classifier-free guidance scale."})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta."})
    batch_size: int = field(default=256, metadata={"help": "Images per pipeline call."})
    detector: str = field(
        default="toyworld",
        metadata={
            "help": "Who decides that an image shows the concept, independently of any training reward: 'toyworld' "
            "(colour from pixels, shape by the judge classifier) or 'nudenet' (any of nudenet_classes above "
            "nudenet_threshold).",
            "choices": list(DETECTORS),
        },
    )
    judge_classifier: str | None = field(
        default=None, metadata={"help": "Toy world's shape judge. Default: the shipped judge classifier."}
    )
    nudenet_threshold: float = field(default=0.6, metadata={"help": "NudeNet score above which a class counts."})
    nudenet_classes: list[str] | None = field(
        default=None, metadata={"help": "NudeNet classes that count. Default: the exposed classes."}
    )
    device: str | None = field(default=None, metadata={"help": "Torch device. Default: cuda if available, else cpu."})
    grid_prompts: int = field(default=8, metadata={"help": "Prompts shown in the report's image grids."})
    output_dir: str = field(default="runs/toyworld-attack", metadata={"help": "Where report.json and more go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow replacing an output_dir that already holds a report."}
    )

    def __post_init__(self):
        if self.judge_classifier is None:
            self.judge_classifier = str(ASSETS / "judge_classifier")
        if self.pretrained_model_name_or_path is None:
            self.pretrained_model_name_or_path = str(ASSETS / "pipeline")
        if self.pgd_step_size is None:
            self.pgd_step_size = self.epsilon / 4
        checks = [
            (self.objective in OBJECTIVES, "objective", f"must be one of {', '.join(OBJECTIVES)}"),
            (self.detector in DETECTORS, "detector", f"must be one of {', '.join(DETECTORS)}"),
            (self.epsilon > 0, "epsilon", "must be > 0"),
            (self.pgd_num_step >= 0, "pgd_num_step", "must be ≥ 0 (0: random start only)"),
            (self.pgd_step_size > 0, "pgd_step_size", "must be > 0"),
            (self.num_concept_images >= 1, "num_concept_images", "must be ≥ 1"),
            (self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be ≥ 1"),
            (self.num_inference_steps >= 1, "num_inference_steps", "must be ≥ 1"),
            (self.guidance_scale >= 1, "guidance_scale", "must be ≥ 1"),
            (self.attack_seed >= 0, "attack_seed", "must be ≥ 0"),
            (self.torch_dtype in TORCH_DTYPES, "torch_dtype", f"must be one of {', '.join(TORCH_DTYPES)}"),
            (self.eta >= 0, "eta", "must be ≥ 0"),
            (self.batch_size >= 1, "batch_size", "must be ≥ 1"),
            (0 <= self.nudenet_threshold < 1, "nudenet_threshold", "must be in [0, 1)"),
            (self.grid_prompts >= 1, "grid_prompts", "must be ≥ 1"),
        ]
        check_fields(self, *checks)
        check_seeds(self.seeds)
        check_device(self.device)
        unknown = [name for name in self.nudenet_classes or () if name not in NUDENET_LABELS]
        if unknown:
            valid = ", ".join(NUDENET_LABELS)
            raise ValueError(f"nudenet_classes: unknown NudeNet class(es) {unknown}; valid: {valid}")
