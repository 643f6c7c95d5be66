"""Configuration of the ReFL trainer (ImageReward paper): the shared diffusion fields plus ReFL's own."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import DiffusionTrainingConfig

REWARD_LOSSES = ("relu", "linear")


@dataclass
class ReFLConfig(DiffusionTrainingConfig):
    r"""Reward feedback learning: the reward's gradient reaches the LoRA weights through one late denoising step.

    Each micro-batch samples `per_device_train_batch_size` prompts, denoises them without grad down to a step drawn
    from `grad_step_window`, takes that one step with grad, predicts x0, decodes it with grad and descends on
    `reward_scale × φ(reward)`. A `pretrain_dataset` adds the ordinary denoising loss on image–caption pairs.
    """

    trainer: str = field(default="refl", metadata={"help": "Which trainer runs the recipe: 'grpo', 'refl' or 'esd'."})
    eta: float = field(default=0.0, metadata={"help": "DDIM stochasticity of the no-grad steps (0: deterministic)."})
    num_inference_steps: int = field(
        default=40, metadata={"help": "DDIM steps of the schedule the gradient step is drawn from (paper: 40)."}
    )
    grad_step_window: list[float] = field(
        default_factory=lambda: [0.75, 1.0],
        metadata={
            "help": "Where the one step with grad is drawn: uniformly among step indices i with "
            "start ≤ i / num_inference_steps < end (paper: steps 30–39 of 40 = [0.75, 1.0])."
        },
    )
    reward_scale: float = field(
        default=1e-3, metadata={"help": "Multiplies φ(reward) in the loss (the paper's grad_scale, 1e-3)."}
    )
    reward_loss: str = field(
        default="relu",
        metadata={
            "help": "φ: 'relu' = ReLU(reward_target − reward) as in the paper's code, 'linear' = −reward.",
            "choices": list(REWARD_LOSSES),
        },
    )
    reward_target: float = field(
        default=2.0, metadata={"help": "c in ReLU(c − reward): rewards above it give no gradient (paper: 2.0)."}
    )
    pretrain_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Image–caption pairs for the pre-training regulariser (the ordinary denoising loss): a `datasets` "
            "Hub id, a local image folder (imagefolder layout with a metadata.jsonl/csv of captions), a local "
            ".csv/.jsonl/.json/.parquet file whose image column holds paths relative to it, or 'toyworld' (the toy "
            "world's generator, without images of target_concept). None (or 'none' on the command line): no "
            "regulariser."
        },
    )
    pretrain_split: str = field(default="train", metadata={"help": "Split of pretrain_dataset."})
    pretrain_image_column: str = field(default="image", metadata={"help": "Column of pretrain_dataset with images."})
    pretrain_caption_column: str = field(
        default="caption", metadata={"help": "Column of pretrain_dataset with captions."}
    )
    pretrain_batch_size: int | None = field(
        default=None,
        metadata={"help": "Pairs per micro-batch for the regulariser. Default: per_device_train_batch_size."},
    )
    pretrain_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the denoising loss beside the reward loss."}
    )
    pretrain_every: int = field(
        default=0,
        metadata={
            "help": "0: mix — every step's loss is reward loss + pretrain_loss_weight × denoising loss. N > 0: "
            "alternate — every N-th optimizer step is a denoising step only, the others reward steps only."
        },
    )
    anchor_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the anchor loss: the mean squared distance between the adapter's and the base "
            "model's (adapter disabled) guided noise predictions, at a step drawn uniformly from the sampled "
            "trajectory, on the rows of anchor_prompts_tags. Unlike the denoising loss it is 0 at the base "
            "model and has no irreducible noise term, so it sees small drifts on the prompts to keep. 0 skips it."
        },
    )
    anchor_prompts_tags: list[str] = field(
        default_factory=lambda: ["safe"],
        metadata={"help": "Tags of the train prompts the anchor loss holds to the base model."},
    )

    trainer_name = "refl"

    def __post_init__(self):
        super().__post_init__()
        if str(self.pretrain_dataset).lower() in ("", "none", "null"):
            self.pretrain_dataset = None  # `--pretrain_dataset none` turns a recipe's regulariser off
        window = self.grad_step_window
        self.check(
            (
                len(window) == 2 and 0 <= window[0] < window[1] <= 1,
                "grad_step_window",
                "must be [start, end] with 0 ≤ start < end ≤ 1, e.g. [0.75, 1.0]",
            ),
            (self.reward_loss in REWARD_LOSSES, "reward_loss", f"must be one of {', '.join(REWARD_LOSSES)}"),
            (self.reward_scale >= 0, "reward_scale", "must be ≥ 0"),
            (self.pretrain_loss_weight >= 0, "pretrain_loss_weight", "must be ≥ 0"),
            (self.anchor_loss_weight >= 0, "anchor_loss_weight", "must be ≥ 0"),
            (self.pretrain_every >= 0, "pretrain_every", "must be ≥ 0 (0 mixes both losses every step)"),
            (self.pretrain_every != 1, "pretrain_every", "1 would never take a reward step; use 0 (mix) or ≥ 2"),
            (self.pretrain_batch_size is None or self.pretrain_batch_size >= 1, "pretrain_batch_size", "must be ≥ 1"),
        )
        if not self.grad_steps():
            raise ValueError(
                f"grad_step_window={window}: holds no step index of a {self.num_inference_steps}-step schedule; "
                "widen it or raise num_inference_steps"
            )
        if self.pretrain_every and not self.pretrain_dataset:
            raise ValueError(f"pretrain_every={self.pretrain_every}: set pretrain_dataset too")

    def grad_steps(self) -> list[int]:
        """The step indices the gradient step is drawn from."""
        start, end = self.grad_step_window
        n = self.num_inference_steps
        return [i for i in range(n) if start <= i / n < end]
