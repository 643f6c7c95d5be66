"""The trainer family: one config/trainer pair per method, picked by a recipe's `trainer:` field."""

from .base import DiffusionTrainer
from .base_config import DiffusionTrainingConfig
from .esd import ESDTrainer
from .esd_config import ESDConfig
from .grpo import DiffusionGRPOTrainer
from .grpo_config import DiffusionGRPOConfig
from .refl import ReFLTrainer
from .refl_config import ReFLConfig

# name -> (config class, trainer class)
TRAINERS = {
    "grpo": (DiffusionGRPOConfig, DiffusionGRPOTrainer),
    "refl": (ReFLConfig, ReFLTrainer),
    "esd": (ESDConfig, ESDTrainer),
}

__all__ = [
    "TRAINERS",
    "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer",
    "DiffusionTrainer",
    "DiffusionTrainingConfig",
    "ESDConfig",
    "ESDTrainer",
    "ReFLConfig",
    "ReFLTrainer",
]
