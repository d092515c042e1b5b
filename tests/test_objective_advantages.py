"""Group advantages against hand values: std, mean-only, leave-one-out; and the reward ablation."""

from __future__ import annotations

import math

import pytest
import torch

from uniapl_megatron.objective import ObjectiveConfig, group_advantages, resolve_weights, rollout_advantages

# Groups are interleaved on purpose: 7 -> [1, 0, 0, 1], 3 -> [0.5, 0.5], 9 -> [2] (alone).
REWARDS = torch.tensor([1.0, 0.5, 0.0, 0.5, 2.0, 0.0, 1.0])
GROUPS = torch.tensor([7, 3, 7, 3, 9, 7, 7])


def test_mean_only():
    adv = group_advantages(REWARDS, GROUPS, norm="mean")
    assert adv.tolist() == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0, -0.5, 0.5])


def test_mean_and_std():
    adv = group_advantages(REWARDS, GROUPS, norm="std", eps=1e-6)
    std7 = math.sqrt((4 * 0.25) / 3)  # sample std of [1, 0, 0, 1]
    a = 0.5 / (std7 + 1e-6)
    # equal rewards (group 3) and a lone sample (group 9) give 0, not NaN
    assert adv.tolist() == pytest.approx([a, 0.0, -a, 0.0, 0.0, -a, a], abs=1e-6)


def test_leave_one_out_mean_and_std():
    adv = group_advantages(REWARDS, GROUPS, norm="mean", leave_one_out=True)
    # r=1: others [0, 0, 1] -> 1 - 1/3; r=0: others [1, 0, 1] -> 0 - 2/3
    assert adv.tolist() == pytest.approx([2 / 3, 0.0, -2 / 3, 0.0, 0.0, -2 / 3, 2 / 3], abs=1e-6)
    adv = group_advantages(REWARDS, GROUPS, norm="std", leave_one_out=True, eps=0.0 + 1e-6)
    s = math.sqrt(1 / 3) + 1e-6
    assert adv.tolist() == pytest.approx([2 / 3 / s, 0.0, -2 / 3 / s, 0.0, 0.0, -2 / 3 / s, 2 / 3 / s], abs=1e-6)


def test_bad_values_are_reported():
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group_ids: expected 2 values"):
        group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="norm must be"):
        group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), norm="max")


def test_rollout_advantages_loss_mode_keeps_signals_apart():
    cfg = ObjectiveConfig(algorithm="a_grpo", lambda_adv=0.5, adv_norm="mean")
    w = resolve_weights(cfg, 0)
    task = torch.tensor([1.0, 0.0, 1.0, 1.0])
    scores = torch.tensor([0.2, 0.6, -1.0, 1.0])
    ids = torch.tensor([0, 0, 1, 1])
    out = rollout_advantages(ids, w, cfg, task_rewards=task, scores=scores)
    assert out.task.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert out.adversarial.tolist() == pytest.approx([-0.2, 0.2, -1.0, 1.0])


def test_rollout_advantages_reward_ablation_adds_scaled_scores():
    cfg = ObjectiveConfig(algorithm="a_grpo", lambda_adv=0.5, adv_norm="mean", adversarial_mode="reward")
    w = resolve_weights(cfg, 0)
    task = torch.tensor([1.0, 0.0, 1.0, 1.0])
    scores = torch.tensor([0.2, 0.6, -1.0, 1.0])
    out = rollout_advantages(torch.tensor([0, 0, 1, 1]), w, cfg, task_rewards=task, scores=scores)
    # rewards 1.1, 0.3 | 0.5, 1.5
    assert out.task.tolist() == pytest.approx([0.4, -0.4, -0.5, 0.5])
    assert out.adversarial.tolist() == [0.0] * 4


def test_rollout_advantages_asks_for_what_the_stage_needs():
    cfg = ObjectiveConfig(algorithm="uniapl")
    w = resolve_weights(cfg, 0)
    with pytest.raises(ValueError, match="uses the task reward; pass task_rewards"):
        rollout_advantages(torch.tensor([0, 0]), w, cfg, scores=torch.zeros(2))
    with pytest.raises(ValueError, match="uses the discriminator; pass scores"):
        rollout_advantages(torch.tensor([0, 0]), w, cfg, task_rewards=torch.zeros(2))
