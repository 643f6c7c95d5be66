"""`ClassifierConfig`: every field of a `rl-safety classifier` recipe (DyART, PGD-AT, TRADES, standard training)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .models import ARCHITECTURES

METHODS = ("dyart", "pgd_at", "trades", "standard")


@dataclass
class ClassifierConfig:
    """A classifier recipe. Distances are L∞ in [0, 1] pixel units (8/255 = 0.0314)."""

    method: str = field(
        default="dyart", metadata={"help": "Training method: dyart, pgd_at, trades or standard (clean cross-entropy)."}
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "Training images: an .npz file with x (uint8, N×H×W×C) and y (integer labels), an image folder "
            "(one sub-folder per class), a `datasets` id (image + label columns), or `toyworld[:N]` (the toy world's "
            "colour/shape images, both heads)."
        },
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation images, same forms as data. Default: the data set's test split if it has one, else "
            "eval_split of data held out."
        },
    )
    image_column: str | None = field(
        default=None,
        metadata={"help": "`datasets` data only: the image column. Default: the first Image column (or image, img)."},
    )
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "`datasets` data only: the integer label column. Default: the first ClassLabel column (or label, "
            "labels, fine_label)."
        },
    )
    eval_split: float = field(
        default=0.2,
        metadata={"help": "Fraction of data held out for evaluation when there is no eval_data/test split."},
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Resize images to this square size. Default: keep (all must match)."}
    )
    architecture: str = field(
        default="small_cnn",
        metadata={
            "help": "small_cnn (small images), resnet18 or wrn28_10 (CIFAR-size), or toyworld (the toy world's "
            "two-head concept classifier, with data: toyworld)."
        },
    )
    width: int | None = field(
        default=None, metadata={"help": "Width: small_cnn/toyworld channels (32), wrn28_10 widen factor (10)."}
    )
    init_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Start from these weights (a model.safetensors, or a folder holding one), e.g. a clean-trained "
            "classifier as DyART's burn-in (the paper's code trains clean first, then resumes)."
        },
    )
    epsilon: float = field(
        default=8 / 255, metadata={"help": "L∞ radius of PGD-AT/TRADES and of the evaluation; DyART's scale."}
    )
    num_train_epochs: int = field(default=30, metadata={"help": "Epochs over the training images."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Images per process and step."})
    learning_rate: float = field(default=0.1, metadata={"help": "Peak learning rate of SGD (Nesterov, OneCycle)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay."})
    max_grad_norm: float | None = field(
        default=0.1, metadata={"help": "Clip the gradient norm to this (DyART's 0.1); null disables."}
    )
    ema_decay: float = field(
        default=0.995, metadata={"help": "Decay of the weight average (EMA) that is evaluated and saved; 0 disables."}
    )
    burn_in_epochs: int | None = field(
        default=None,
        metadata={
            "help": "Clean cross-entropy epochs before the robust term starts (DyART's margins, PGD-AT's or TRADES' "
            "adversarial examples); standard training ignores it. None: 10 for DyART (the paper's), 0 for PGD-AT and "
            "TRADES (Madry's and Zhang's). Set it to compare methods on one schedule."
        },
    )
    dyart_heads: list[str] | None = field(
        default=None,
        metadata={"help": "Multi-head models: the heads DyART makes robust (others get cross-entropy). Default: all."},
    )
    dyart_beta: float = field(default=5.0, metadata={"help": "Temperature β of the soft margin φ."})
    dyart_lambda: float = field(default=1000.0, metadata={"help": "Weight λ of the margin term."})
    dyart_r0: float | None = field(
        default=None, metadata={"help": "Radii ≥ r0 get no weight (h′ = 0). Default: 2·epsilon (16/255 at 8/255)."}
    )
    dyart_alpha: float | None = field(
        default=None,
        metadata={"help": "Decay α of h′(r) = exp(−α r). Default: 3·(8/255)/epsilon (3 at 8/255; α·r is kept)."},
    )
    dyart_start_radius: float | None = field(
        default=None, metadata={"help": "Random start radius of the boundary search. Default: epsilon/2."}
    )
    dyart_search_steps: int = field(default=20, metadata={"help": "Iterations of the FAB-style boundary search."})
    dyart_overshoot: float = field(default=1.05, metadata={"help": "Overshoot η of each boundary-search step."})
    dyart_min_phi: float = field(default=-0.3, metadata={"help": "Closest-point filter: keep x̂ only if φ(x̂) > this."})
    pgd_steps: int = field(default=10, metadata={"help": "PGD-AT / TRADES attack steps during training."})
    pgd_step_size: float | None = field(default=None, metadata={"help": "Their step size. Default: epsilon/4."})
    trades_beta: float = field(default=6.0, metadata={"help": "TRADES' weight of the KL robustness term."})
    eval_epsilons: list[float] | None = field(
        default=None,
        metadata={"help": "Radii of the robust-accuracy curve. Default: [epsilon/2, epsilon, 3·epsilon/2]."},
    )
    autoattack_epsilons: list[float] | None = field(
        default=None,
        metadata={
            "help": "Radii AutoAttack runs at (the slow attack; PGD covers every eval_epsilons). Default: [epsilon]."
        },
    )
    eval_samples: int | None = field(
        default=1000, metadata={"help": "Evaluation images attacked (the first N of the eval set); null: all."}
    )
    eval_pgd_steps: int = field(default=20, metadata={"help": "Steps of the PGD evaluation (step epsilon/4)."})
    autoattack: bool = field(
        default=True, metadata={"help": "Run AutoAttack (torchattacks, standard: APGD-CE, APGD-T, FAB-T, Square)."}
    )
    eval_batch_size: int = field(default=256, metadata={"help": "Images per attack batch."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, shuffling, split and attacks."})
    logging_steps: int = field(default=10, metadata={"help": "Log training metrics every N steps."})
    output_dir: str = field(
        default="runs/classifier",
        metadata={"help": "Where the checkpoint and reports go; {method} is replaced by the method."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow replacing an output_dir that already holds a run."}
    )
    save_steps: int | None = field(
        default=None,
        metadata={
            "help": "Write a checkpoint (output_dir/checkpoint-STEP) every N steps; null: at the end of every epoch. "
            "The last step is always saved, so a run killed during its evaluation does not train again."
        },
    )
    save_total_limit: int | None = field(
        default=1,
        metadata={
            "help": "Complete checkpoints kept (older ones are deleted once a newer one is complete); null keeps "
            "all. A finished run deletes its checkpoints: its results are model.safetensors and the reports."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Continue an interrupted run: `last` (the newest complete checkpoint in output_dir) or a "
            "checkpoint folder. The other settings must be those the checkpoint was trained with."
        },
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {', '.join(METHODS)}")
        if self.burn_in_epochs is None:
            self.burn_in_epochs = 10 if self.method == "dyart" else 0
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name}={value!r}: expected a finite number")
        optional = lambda name, ok: getattr(self, name) is None or ok(getattr(self, name))  # noqa: E731
        checks = [
            ("epsilon", 0 < self.epsilon < 1, "in (0, 1), e.g. 0.0314 for 8/255"),
            ("num_train_epochs", self.num_train_epochs >= 1, ">= 1"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, ">= 1"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("momentum", 0 < self.momentum < 1, "in (0, 1) (SGD with Nesterov momentum needs one)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("eval_split", 0 < self.eval_split < 1, "in (0, 1)"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("burn_in_epochs", self.burn_in_epochs >= 0, ">= 0"),
            ("dyart_beta", self.dyart_beta > 0, "> 0"),
            ("dyart_lambda", self.dyart_lambda >= 0, ">= 0"),
            ("dyart_r0", optional("dyart_r0", lambda v: v > 0), "> 0, or null for 2·epsilon"),
            ("dyart_alpha", optional("dyart_alpha", lambda v: v >= 0), ">= 0, or null for 3·(8/255)/epsilon"),
            ("dyart_start_radius", optional("dyart_start_radius", lambda v: 0 <= v < 1), "in [0, 1), or null"),
            ("dyart_search_steps", self.dyart_search_steps >= 1, ">= 1"),
            ("dyart_overshoot", self.dyart_overshoot >= 1, ">= 1 (each search step goes past the boundary)"),
            ("dyart_min_phi", self.dyart_min_phi < 0, "< 0 (found points have φ < 0: a value >= 0 keeps none)"),
            ("pgd_steps", self.pgd_steps >= 1, ">= 1"),
            ("pgd_step_size", optional("pgd_step_size", lambda v: 0 < v < 1), "in (0, 1), or null for epsilon/4"),
            ("trades_beta", self.trades_beta >= 0, ">= 0"),
            ("width", optional("width", lambda v: v >= 1), ">= 1, or null for the architecture's default"),
            ("image_size", optional("image_size", lambda v: v >= 1), ">= 1 pixels, or null to keep the size"),
            ("eval_samples", optional("eval_samples", lambda v: v >= 1), ">= 1, or null for the whole eval set"),
            ("eval_pgd_steps", self.eval_pgd_steps >= 1, ">= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("seed", 0 <= self.seed < 2**32, "in [0, 2**32)"),
            ("logging_steps", self.logging_steps >= 1, ">= 1"),
            ("save_steps", optional("save_steps", lambda v: v >= 1), ">= 1, or null to save every epoch"),
            ("save_total_limit", optional("save_total_limit", lambda v: v >= 1), ">= 1, or null to keep all"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")
        if self.method != "standard" and self.burn_in_epochs >= self.num_train_epochs:
            raise ValueError(
                f"burn_in_epochs={self.burn_in_epochs} leaves no {self.method} epoch of num_train_epochs="
                f"{self.num_train_epochs}; lower burn_in_epochs or raise num_train_epochs"
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm}: expected > 0, or null to disable clipping")
        if self.dyart_heads is not None and not self.dyart_heads:
            raise ValueError("dyart_heads=[]: name at least one head (e.g. [colour]), or leave it unset for all")
        if self.eval_epsilons is not None and not all(0 < e < 1 for e in self.eval_epsilons):
            raise ValueError(f"eval_epsilons={self.eval_epsilons}: each must be in (0, 1)")
        if self.autoattack_epsilons is not None and not all(0 < e < 1 for e in self.autoattack_epsilons):
            raise ValueError(f"autoattack_epsilons={self.autoattack_epsilons}: each must be in (0, 1)")
        if self.autoattack_epsilons and not self.autoattack:
            raise ValueError(
                f"autoattack_epsilons={self.autoattack_epsilons} with autoattack=false: AutoAttack would not run; "
                "set --autoattack true or drop autoattack_epsilons"
            )
        if not self.output_dir:
            raise ValueError("output_dir='': name the folder for the checkpoint and reports")

    # Distances follow epsilon unless set (the paper pairs r0 = 16/255, start 4/255, α = 3 with epsilon = 8/255).
    @property
    def r0(self) -> float:
        return 2 * self.epsilon if self.dyart_r0 is None else self.dyart_r0

    @property
    def alpha(self) -> float:
        return 3 * (8 / 255) / self.epsilon if self.dyart_alpha is None else self.dyart_alpha

    @property
    def start_radius(self) -> float:
        return self.epsilon / 2 if self.dyart_start_radius is None else self.dyart_start_radius

    @property
    def step_size(self) -> float:
        return self.epsilon / 4 if self.pgd_step_size is None else self.pgd_step_size

    @property
    def epsilons(self) -> list[float]:
        if self.eval_epsilons:
            return sorted(self.eval_epsilons)
        return [self.epsilon / 2, self.epsilon, 1.5 * self.epsilon]
