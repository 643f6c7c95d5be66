"""Configuration of the diffusion GRPO trainer: the shared diffusion fields plus GRPO's (TRL names and meanings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..advantages import SCALE_CHOICES
from .base_config import DiffusionTrainingConfig


@dataclass
class DiffusionGRPOConfig(DiffusionTrainingConfig):
    r"""GRPO for text-to-image diffusion with LoRA adapters.

    Field names follow TRL's `GRPOConfig` where the meaning is the same. A "completion" is one image trajectory;
    `per_device_train_batch_size` counts images per device per micro-batch, and each optimizer step consumes
    `per_device_train_batch_size × gradient_accumulation_steps` images per device.
    """

    trainer: str = field(default="grpo", metadata={"help": "Which trainer runs the recipe: 'grpo', 'refl' or 'esd'."})
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
    beta_prompts_tags: list[str] | None = field(
        default=None,
        metadata={
            "help": "Tags of the train prompts the KL applies to, e.g. ['safe']: the model is held to the base where "
            "it should not change, and left free where it should. Default: every prompt. The reference forward "
            "runs on those rows only."
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
    adv_clip_max: float = field(
        default=5.0, metadata={"help": "Advantages are clipped to [-adv_clip_max, adv_clip_max]."}
    )
    eta: float = field(
        default=1.0, metadata={"help": "DDIM stochasticity (> 0: the policy needs noise to have a log-prob)."}
    )
    timestep_fraction: float = field(
        default=1.0,
        metadata={"help": "Fraction of each trajectory's denoising steps trained on (sampled per image)."},
    )
    same_initial_noise_per_group: bool = field(
        default=True,
        metadata={"help": "Start all images of a prompt's group from the same x_T (DanceGRPO / SafeDiffusion-R1)."},
    )

    explore_generations: int = field(
        default=0,
        metadata={
            "help": "Images of each group (of a prompt with one of explore_prompts_tags) drawn from the exploration "
            "prompt (the prompt with explore_drop_words removed) instead of by the policy: when the model draws the "
            "concept in every image, a group has nothing better to learn from, and these images bring concept-free "
            "alternatives into it. They are scored against the real prompt and trained on as the policy's own "
            "(their old log-probs are the policy's). 0 disables."
        },
    )
    explore_drop_words: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Words removed (whole words, any case) from a prompt to make its exploration prompt, e.g. "
            "['{target_concept}']; prompts without them are explored as they are."
        },
    )
    explore_from_base: bool = field(
        default=True,
        metadata={
            "help": "Draw the exploration images with the base model (the adapter disabled) rather than the policy: "
            "the base model's concept-free images for concept prompts, and its own images for the prompts to keep, "
            "so a group the policy has damaged still holds what it should draw."
        },
    )
    explore_prompts_tags: list[str] | None = field(
        default=None,
        metadata={
            "help": "Tags of the train prompts whose groups get exploration images. Default: every prompt "
            "(adversarial rows excepted: their embeddings are the attack's, not a prompt's)."
        },
    )

    trainer_name = "grpo"

    def __post_init__(self):
        super().__post_init__()
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        self.check(
            (self.num_generations >= 2, "num_generations", "must be ≥ 2 (a group needs at least two images)"),
            (self.num_iterations >= 1, "num_iterations", "must be ≥ 1"),
            (self.eta > 0, "eta", "must be > 0 (a deterministic step has no log-prob)"),
            (0 < self.timestep_fraction <= 1, "timestep_fraction", "must be in (0, 1]"),
            (self.epsilon > 0, "epsilon", "must be > 0"),
            (self.beta >= 0, "beta", "must be ≥ 0"),
            (self.adv_clip_max > 0, "adv_clip_max", "must be > 0"),
            (self.scale_rewards in SCALE_CHOICES, "scale_rewards", f"must be one of {', '.join(SCALE_CHOICES)}"),
            (
                0 <= self.explore_generations < self.num_generations,
                "explore_generations",
                f"must be in [0, num_generations={self.num_generations}) (a group keeps at least one policy image)",
            ),
            (
                not self.explore_generations or self.explore_from_base or bool(self.explore_drop_words),
                "explore_drop_words",
                "must name at least one word when exploring with the policy itself (explore_from_base: false), or "
                "its exploration images are its own (e.g. ['{target_concept}'])",
            ),
        )
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        self.check((self.steps_per_generation >= 1, "steps_per_generation", "must be ≥ 1"))
        self.generation_batch_size = self.per_device_train_batch_size * self.world_size * self.steps_per_generation
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"num_generations={self.num_generations}: must divide the global rollout of "
                f"{self.generation_batch_size} images (per_device_train_batch_size {self.per_device_train_batch_size}"
                f" × {self.world_size} processes × steps_per_generation {self.steps_per_generation})"
            )
