"""Fields every diffusion trainer shares: `transformers.TrainingArguments`, the rewards, sampling and the LoRA adapter.

Each trainer's config (`DiffusionGRPOConfig`, `ReFLConfig`, ...) subclasses this one and adds its own fields; the
recipe's `trainer:` field picks the pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import SchedulerType, TrainingArguments

from ..hub import check_repo_id


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

    # Adversarial training (RACE): names follow the RACE repository where they do not clash with TRL's (GRPO's
    # `epsilon` is the clip range, so the attack radius is `adv_epsilon`).
    adv_train: bool = field(
        default=False,
        metadata={
            "help": "RACE: PGD finds adversarial text embeddings of the concept prompts against the current policy "
            "every adv_refresh_steps; a share (adv_share) of the concept prompts' rows trains on them, tagged "
            "'adversarial' for the rewards."
        },
    )
    adv_epsilon: float = field(default=0.5, metadata={"help": "L∞ radius of the attack around the clean embedding."})
    pgd_num_step: int = field(default=10, metadata={"help": "PGD steps per refresh (RACE: 10)."})
    pgd_step_size: float | None = field(
        default=None, metadata={"help": "Signed PGD step. Default: adv_epsilon / 4 (the RACE repository's ratio)."}
    )
    adv_objective: str = field(
        default="race",
        metadata={
            "help": "Attack objective: 'race' or 'unlearndiff' (see `rl-safety attack`).",
            "choices": ["race", "unlearndiff"],
        },
    )
    adv_start_step: int = field(
        default=0,
        metadata={
            "help": "First optimizer step with adversarial rows (RACE hardens an already erased model: training is "
            "plain erasure before it, adversarial after, within one budget)."
        },
    )
    adv_refresh_steps: int = field(default=5, metadata={"help": "Optimizer steps between refreshes of the pool."})
    adv_share: float = field(
        default=0.5, metadata={"help": "Probability that a concept prompt's rows use its adversarial embedding."}
    )
    adv_prompts_tag: str = field(
        default="unsafe", metadata={"help": "Tag of the train prompts that get adversarial embeddings."}
    )
    adv_num_concept_images: int = field(
        default=1, metadata={"help": "Concept images per prompt (base model) that the attack objective noises."}
    )

    # Subclasses name themselves here; a recipe whose `trainer:` differs is refused.
    trainer_name = "grpo"
    # Whether the method learns from `rewards` (the train script refuses an empty list when it does).
    needs_rewards = True

    def __post_init__(self):
        schedulers = [kind.value for kind in SchedulerType]
        if str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) not in schedulers:
            # transformers' own message does not name the field
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type!r}: must be one of {', '.join(schedulers)}")
        super().__post_init__()
        if str(self.eval_config).lower() in ("", "none", "null"):
            self.eval_config = None  # `--eval_config none` skips a recipe's evaluation
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
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be ≥ 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be ≥ 1"),
            (self.weight_decay >= 0, "weight_decay", "must be ≥ 0"),
            (0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)"),
            (0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)"),
            (self.adam_epsilon >= 0, "adam_epsilon", "must be ≥ 0"),
            (self.save_steps > 0, "save_steps", "must be > 0 (a fraction of the run, or a step count)"),
            (self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "must be ≥ 1 or unset"),
            (self.logging_steps > 0, "logging_steps", "must be > 0 (a fraction of the run, or a step count)"),
            (self.max_grad_norm >= 0, "max_grad_norm", "must be ≥ 0 (0: no clipping)"),
            (self.seed >= 0, "seed", "must be ≥ 0"),
            (self.max_steps == -1 or self.max_steps >= 1, "max_steps", "must be ≥ 1, or -1 to train num_train_epochs"),
            (self.max_steps >= 1 or self.num_train_epochs > 0, "num_train_epochs", "must be > 0 when max_steps is -1"),
            (self.dataloader_num_workers >= 0, "dataloader_num_workers", "must be ≥ 0"),
            (self.resolution is None or self.resolution >= 8, "resolution", "must be ≥ 8 (or unset: the model's own)"),
            (self.resolution is None or self.resolution % 8 == 0, "resolution", "must be a multiple of 8"),
            (self.sample_batch_size is None or self.sample_batch_size >= 1, "sample_batch_size", "must be ≥ 1"),
            (self.adv_epsilon > 0, "adv_epsilon", "must be > 0"),
            (self.pgd_num_step >= 0, "pgd_num_step", "must be ≥ 0"),
            (self.adv_objective in ("race", "unlearndiff"), "adv_objective", "must be 'race' or 'unlearndiff'"),
            (self.adv_refresh_steps >= 1, "adv_refresh_steps", "must be ≥ 1"),
            (self.adv_start_step >= 0, "adv_start_step", "must be ≥ 0"),
            (0 <= self.adv_share <= 1, "adv_share", "must be in [0, 1]"),
            (self.adv_num_concept_images >= 1, "adv_num_concept_images", "must be ≥ 1"),
        )
        check_trackers(self.report_to)
        if self.pgd_step_size is None:
            self.pgd_step_size = self.adv_epsilon / 4
        self.check((self.pgd_step_size > 0, "pgd_step_size", "must be > 0"))
        if self.push_to_hub:
            # Checked now, before any training, rather than when the run is over.
            self.check(
                (bool(self.hub_model_id), "push_to_hub", "needs hub_model_id: user/name, the repository to create")
            )
            check_repo_id(self.hub_model_id, flag="hub_model_id")

    def lora_targets(self) -> str | list[str]:
        """What the LoRA adapter wraps (peft's `target_modules`: module-name suffixes, or one full-match regex)."""
        return list(self.lora_target_modules)

    def check(self, *rules: tuple[bool, str, str]) -> None:
        """Raise `ValueError("<field>=<value>: <rule>")` for the first rule that does not hold."""
        for ok, name, rule in rules:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {rule}")


def check_trackers(report_to: list[str]) -> None:
    """Every tracker is one transformers knows and is installed here; found now, not when the Trainer is built."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    for name in report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            valid = ", ".join(["none", "all", *INTEGRATION_TO_CALLBACK])
            raise ValueError(f"report_to={name!r}: not a tracker; valid: {valid}")
        if name not in get_available_reporting_integrations():
            raise ValueError(f"report_to={name!r}: not installed here (pip install {name.replace('_', '-')})")
