"""Configuration of the ESD trainer (Erased Stable Diffusion, Gandikota et al. 2023): the shared diffusion fields
plus ESD's own."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import DiffusionTrainingConfig

# Full-match regexes (peft's `target_modules` as a string) over diffusers UNet module names, per `train_method`.
_ATTN = r"(to_q|to_k|to_v|to_out\.0)"
# Every other Linear / Conv2d inside the UNet's blocks: transformer projections and feed-forward, resnets, resamplers.
_BLOCK_LAYERS = r"proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2|conv_shortcut|time_emb_proj|conv"
TRAIN_METHOD_MODULES = {
    "xattn": rf".*\.attn2\.{_ATTN}",
    "selfattn": rf".*\.attn1\.{_ATTN}",
    # ESD-u: everything except cross-attention, the time embedding and the output convolution.
    "noxattn": rf"conv_in|.*\.(attn1\.{_ATTN}|{_BLOCK_LAYERS})",
    "full": rf"conv_in|conv_out|time_embedding\.linear_[12]|.*\.(attn[12]\.{_ATTN}|{_BLOCK_LAYERS})",
}
TRAIN_METHODS = tuple(TRAIN_METHOD_MODULES)


@dataclass
class ESDConfig(DiffusionTrainingConfig):
    r"""Erased Stable Diffusion: fine-tune the model so that, conditioned on the concept c, it predicts the frozen
    model's noise guided *away* from c: ε_θ(z, t, c) → ε(z, t) − η (ε(z, t, c) − ε(z, t)).

    Each micro-batch takes `per_device_train_batch_size` concept prompts (the `erase_prompts_tag` rows of
    `train_prompts`), samples z with the current model (DDIM, CFG `start_guidance`) down to a step k drawn uniformly
    from the `num_inference_steps` schedule, draws a training timestep t inside step k's interval, and regresses the
    adapter's prediction on the target. No rewards.
    """

    trainer: str = field(default="esd", metadata={"help": "Which trainer runs the recipe: 'grpo', 'refl' or 'esd'."})
    eta: float = field(
        default=0.0, metadata={"help": "DDIM stochasticity while sampling the training latents (ESD: 0)."}
    )
    num_inference_steps: int = field(
        default=50,
        metadata={"help": "DDIM steps of the schedule the stop step k is drawn from (uniformly; ESD: 50)."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "UNet module names the adapter wraps. Default (None): the modules of train_method, as a "
            "full-match regex over module names."
        },
    )
    negative_guidance: float = field(
        default=1.0,
        metadata={"help": "η in the target ε(z, t) − η (ε(z, t, c) − ε(z, t)): how far to guide away from c."},
    )
    start_guidance: float = field(
        default=3.0,
        metadata={
            "help": "Classifier-free guidance scale used to sample the training latents z with the current model "
            "(ESD: 3). guidance_scale is not used by ESD."
        },
    )
    train_method: str = field(
        default="xattn",
        metadata={
            "help": "Which UNet modules the LoRA adapter wraps (unless lora_target_modules is set): 'xattn' = "
            "cross-attention (attn2) only (ESD-x), 'noxattn' = everything but cross-attention, the time embedding "
            "and conv_out (ESD-u), 'selfattn' = self-attention (attn1), 'full' = every Linear/Conv2d layer.",
            "choices": list(TRAIN_METHODS),
        },
    )
    erase_prompts_tag: str = field(
        default="unsafe",
        metadata={
            "help": "Tag of the train_prompts rows that name the concept to erase; ESD trains on these only "
            "(other rows are ignored)."
        },
    )

    trainer_name = "esd"
    needs_rewards = False

    def __post_init__(self):
        super().__post_init__()
        self.check(
            (
                self.train_method in TRAIN_METHODS,
                "train_method",
                f"must be one of {', '.join(TRAIN_METHODS)}",
            ),
            (self.negative_guidance >= 0, "negative_guidance", "must be ≥ 0 (η; ESD uses 1.0)"),
            (self.start_guidance >= 1, "start_guidance", "must be ≥ 1 (1 samples without classifier-free guidance)"),
            (
                not self.rewards,
                "rewards",
                "ESD trains without rewards (its target is the frozen model's own prediction); remove them",
            ),
            (
                bool(self.erase_prompts_tag),
                "erase_prompts_tag",
                "must name the tag of the concept prompts, e.g. unsafe",
            ),
            (
                self.lora_target_modules is None or len(self.lora_target_modules) > 0,
                "lora_target_modules",
                "must name at least one module, or be left unset to follow train_method",
            ),
        )

    def lora_targets(self) -> str | list[str]:
        """What the adapter wraps: `lora_target_modules` when set, else `train_method`'s module regex."""
        if self.lora_target_modules is not None:
            return list(self.lora_target_modules)
        return TRAIN_METHOD_MODULES[self.train_method]
