"""Fields every diffusion trainer shares: `transformers.TrainingArguments`, the rewards, sampling and the LoRA adapter.

Each trainer's config (`DiffusionGRPOConfig`, `ReFLConfig`, ...) subclasses this one and adds its own fields; the
recipe's `trainer:` field picks the pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments


@dataclass
class DiffusionTrainingConfig(TrainingArguments):
    """Shared configuration of the rl_safety trainers (a LoRA adapter on a Stable Diffusion UNet)."""

    trainer: str = field(
        default="grpo",
        metadata={
            "help": "Which trainer runs the recipe: 'grpo' (DiffusionGRPOTrainer), 'refl' (ReFLTrainer) or 'esd' "
            "(ESDTrainer)."
        },
    )

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
    eval_config: str | None = field(
        default=None,
        metadata={
            "help": "An evaluation recipe (e.g. recipes/toyworld/eval.yaml) run on the base model and the trained "
            "adapter when training ends; the report goes to OUTPUT_DIR/eval and the before/after table is printed."
        },
    )

    # Diffusion sampling.
    num_inference_steps: int = field(default=10, metadata={"help": "DDIM steps per sampled trajectory."})
    eta: float = field(default=1.0, metadata={"help": "DDIM stochasticity (0: deterministic DDIM)."})
    guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale (1 disables CFG)."})
    negative_prompt: str = field(default="", metadata={"help": "Prompt of the unconditional CFG branch."})
    resolution: int | None = field(
        default=None, metadata={"help": "Image height and width in pixels. Default: the UNet's native size."}
    )
    sample_batch_size: int | None = field(
        default=None,
        metadata={"help": "Images per UNet call while sampling. Default: the whole per-device batch at once."},
    )

    # LoRA.
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha. Default: lora_rank (scale 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        metadata={"help": "UNet module names the adapter wraps."},
    )

    # Subclasses name themselves here; a recipe whose `trainer:` differs is refused.
    trainer_name = "grpo"
    # Whether the method learns from `rewards` (the train script refuses an empty list when it does).
    needs_rewards = True

    def __post_init__(self):
        super().__post_init__()
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        if self.trainer != self.trainer_name:
            raise ValueError(f"trainer={self.trainer!r}: this configuration is {type(self).__name__}")
        self.check(
            (self.eta >= 0, "eta", "must be ≥ 0"),
            (self.num_inference_steps >= 1, "num_inference_steps", "must be ≥ 1"),
            (self.guidance_scale >= 1, "guidance_scale", "must be ≥ 1 (1 disables classifier-free guidance)"),
            (self.lora_rank >= 1, "lora_rank", "must be ≥ 1"),
            (self.lora_alpha > 0, "lora_alpha", "must be > 0"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.resolution is None or self.resolution % 8 == 0, "resolution", "must be a multiple of 8"),
            (self.sample_batch_size is None or self.sample_batch_size >= 1, "sample_batch_size", "must be ≥ 1"),
        )

    def lora_targets(self) -> str | list[str]:
        """What the LoRA adapter wraps (peft's `target_modules`: module-name suffixes, or one full-match regex)."""
        return list(self.lora_target_modules)

    def check(self, *rules: tuple[bool, str, str]) -> None:
        """Raise `ValueError("<field>=<value>: <rule>")` for the first rule that does not hold."""
        for ok, name, rule in rules:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {rule}")
