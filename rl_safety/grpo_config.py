"""Configuration of the diffusion GRPO trainer: `transformers.TrainingArguments` plus GRPO and diffusion fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .advantages import SCALE_CHOICES


@dataclass
class DiffusionGRPOConfig(TrainingArguments):
    r"""GRPO for text-to-image diffusion with LoRA adapters.

    Field names follow TRL's `GRPOConfig` where the meaning is the same. A "completion" is one image trajectory;
    `per_device_train_batch_size` counts images per device per micro-batch, and each optimizer step consumes
    `per_device_train_batch_size × gradient_accumulation_steps` images per device.
    """

    # Defaults that differ from TrainingArguments.
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate for the LoRA weights."})
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Images (trajectories) per device in each micro-batch of the update."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the trainer needs the prompt and tag columns."}
    )
    dataloader_pin_memory: bool = field(
        default=False, metadata={"help": "Kept False: the dataloader yields prompt strings, nothing to pin."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into an output_dir that already holds a run (otherwise refused)."},
    )

    # GRPO (TRL names and meanings).
    num_generations: int = field(
        default=4, metadata={"help": "Images sampled per prompt (the group); must be ≥ 2 and divide the global batch."}
    )
    steps_per_generation: int | None = field(
        default=None,
        metadata={"help": "Micro-batches per rollout. Default: gradient_accumulation_steps (one rollout per step)."},
    )
    num_iterations: int = field(
        default=1, metadata={"help": "Optimisation passes over each rollout (μ in the GRPO paper)."}
    )
    beta: float = field(
        default=0.0,
        metadata={
            "help": "KL coefficient to the base model (the UNet with its adapter disabled, so no second copy in "
            "memory). 0 skips the reference forward. Diffusion GRPO papers use 0.01–0.04."
        },
    )
    epsilon: float = field(
        default=1e-4, metadata={"help": "Clip range of the importance ratio (diffusion GRPO uses ~1e-4, not 0.2)."}
    )
    scale_rewards: str = field(
        default="group",
        metadata={
            "help": "Advantage scaling: 'group' (divide by each group's std), 'batch' (the whole batch's std) or "
            "'none' (Dr. GRPO).",
            "choices": list(SCALE_CHOICES),
        },
    )
    rewards: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={
            "help": "Reward modules: a list of {name, weight, args, alias}. On the command line, JSON objects: "
            '--rewards \'{"name": "jpeg_incompressibility"}\'.'
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of the rewards, in order; overrides each entry's `weight` when given."},
    )
    adv_clip_max: float = field(
        default=5.0, metadata={"help": "Advantages are clipped to [-adv_clip_max, adv_clip_max]."}
    )

    eval_config: str | None = field(
        default=None,
        metadata={
            "help": "An evaluation recipe (e.g. recipes/toyworld/eval.yaml) run on the base model and the trained "
            "adapter when training ends; the report goes to OUTPUT_DIR/eval and the before/after table is printed."
        },
    )

    # Diffusion sampling.
    num_inference_steps: int = field(default=10, metadata={"help": "DDIM steps per sampled trajectory."})
    eta: float = field(
        default=1.0, metadata={"help": "DDIM stochasticity (> 0: the policy needs noise to have a log-prob)."}
    )
    guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale (1 disables CFG)."})
    negative_prompt: str = field(default="", metadata={"help": "Prompt of the unconditional CFG branch."})
    resolution: int | None = field(
        default=None, metadata={"help": "Image height and width in pixels. Default: the UNet's native size."}
    )
    timestep_fraction: float = field(
        default=1.0,
        metadata={"help": "Fraction of each trajectory's denoising steps trained on (sampled per image)."},
    )
    sample_batch_size: int | None = field(
        default=None,
        metadata={"help": "Images per UNet call while sampling. Default: the whole per-device rollout at once."},
    )
    same_initial_noise_per_group: bool = field(
        default=True,
        metadata={"help": "Start all images of a prompt's group from the same x_T (DanceGRPO / SafeDiffusion-R1)."},
    )

    # LoRA.
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha. Default: lora_rank (scale 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        metadata={"help": "UNet module names the adapter wraps."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        checks = [
            (self.num_generations >= 2, "num_generations", "must be ≥ 2 (a group needs at least two images)"),
            (self.num_iterations >= 1, "num_iterations", "must be ≥ 1"),
            (self.eta > 0, "eta", "must be > 0 (a deterministic step has no log-prob)"),
            (0 < self.timestep_fraction <= 1, "timestep_fraction", "must be in (0, 1]"),
            (self.epsilon > 0, "epsilon", "must be > 0"),
            (self.beta >= 0, "beta", "must be ≥ 0"),
            (self.adv_clip_max > 0, "adv_clip_max", "must be > 0"),
            (self.num_inference_steps >= 1, "num_inference_steps", "must be ≥ 1"),
            (self.lora_rank >= 1, "lora_rank", "must be ≥ 1"),
            (self.scale_rewards in SCALE_CHOICES, "scale_rewards", f"must be one of {', '.join(SCALE_CHOICES)}"),
            (self.resolution is None or self.resolution % 8 == 0, "resolution", "must be a multiple of 8"),
            (self.sample_batch_size is None or self.sample_batch_size >= 1, "sample_batch_size", "must be ≥ 1"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {rule}")
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        self.generation_batch_size = self.per_device_train_batch_size * self.world_size * self.steps_per_generation
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"num_generations={self.num_generations}: must divide the global rollout of "
                f"{self.generation_batch_size} images (per_device_train_batch_size {self.per_device_train_batch_size}"
                f" × {self.world_size} processes × steps_per_generation {self.steps_per_generation})"
            )
