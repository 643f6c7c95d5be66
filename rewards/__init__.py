"""Reward modules for rl_safety, installed as `rl_safety.rewards`."""

from .base import (
    ENTRY_POINT_GROUP,
    Reward,
    RewardError,
    RewardOutput,
    RewardStack,
    available_rewards,
    build_reward,
    default_reward_name,
    resolve_reward,
)
from .jpeg import JpegCompressibility, JpegIncompressibility, jpeg_kilobytes

__all__ = [
    "ENTRY_POINT_GROUP",
    "JpegCompressibility",
    "JpegIncompressibility",
    "Reward",
    "RewardError",
    "RewardOutput",
    "RewardStack",
    "available_rewards",
    "build_reward",
    "default_reward_name",
    "jpeg_kilobytes",
    "resolve_reward",
]
