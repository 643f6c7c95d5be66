"""Group-relative advantages (GRPO): each image is scored against the other images of its prompt's group."""

from __future__ import annotations

import torch

SCALE_CHOICES = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages for rewards laid out group after group (`num_generations` consecutive entries per prompt).

    Returns `(advantages, group_std)`: reward minus its group mean, divided by the group's std (`"group"`), the whole
    batch's std (`"batch"`), or nothing (`"none"`); `group_std` (one value per sample) feeds `frac_reward_zero_std`.
    """
    if scale_rewards not in SCALE_CHOICES:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {', '.join(SCALE_CHOICES)}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}")
    grouped = rewards.reshape(-1, num_generations)
    mean = grouped.mean(dim=1, keepdim=True)
    group_std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean)
    advantages = grouped - mean
    if scale_rewards == "group":
        advantages = advantages / (group_std + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + eps)
    return advantages.reshape(-1), group_std.expand_as(grouped).reshape(-1)
