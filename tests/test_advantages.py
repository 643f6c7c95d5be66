import pytest
import torch

from rl_safety.advantages import group_advantages


def test_group_scaling_hand_computed():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0])
    adv, std = group_advantages(rewards, num_generations=2, scale_rewards="group", eps=0.0 + 1e-12)
    s = torch.tensor([1.0, 3.0]).std()  # unbiased std of the first group = sqrt(2)
    torch.testing.assert_close(adv[:2], torch.tensor([-1.0, 1.0]) / s)
    torch.testing.assert_close(adv[2:], torch.zeros(2))  # a group with equal rewards teaches nothing
    torch.testing.assert_close(std, torch.tensor([s, s, 0.0, 0.0]))


def test_batch_and_none_scaling():
    rewards = torch.tensor([0.0, 2.0, 4.0, 8.0])
    adv_none, _ = group_advantages(rewards, 2, "none")
    torch.testing.assert_close(adv_none, torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    adv_batch, _ = group_advantages(rewards, 2, "batch", eps=0.0)
    torch.testing.assert_close(adv_batch, adv_none / rewards.std())


def test_bad_input():
    with pytest.raises(ValueError, match="num_generations=3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "median")
