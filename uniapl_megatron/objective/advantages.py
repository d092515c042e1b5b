"""Group-relative advantages for rollouts: task rewards and discriminator scores alike.

Each prompt's G samples form a group. A sample's advantage is its value minus a baseline
(the group mean, or the mean of the other G - 1 samples with leave-one-out), divided by the
group's standard deviation (+ eps) when ``norm == "std"``. The std is the sample std (divisor
G - 1), as TRL and verl compute it. A group of one sample, or one whose values are all equal,
gets advantage 0: it carries no relative signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uniapl_megatron.objective.config import ObjectiveConfig
from uniapl_megatron.objective.presets import StepWeights


def _check_1d(name: str, t: torch.Tensor, n: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name}: expected {n} values (one per rollout), got {t.numel()}")


def group_advantages(
    values: torch.Tensor, group_ids: torch.Tensor, *, norm: str = "std", leave_one_out: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """Advantages [N] of values [N] within the groups given by group_ids [N] (any integer labels)."""
    _check_1d("values", values)
    _check_1d("group_ids", group_ids, values.numel())
    if norm not in ("std", "mean"):
        raise ValueError(f"group_advantages: norm must be 'std' or 'mean', got {norm!r}")
    if not torch.isfinite(values).all():
        raise ValueError("group_advantages: values contain NaN or inf")
    if values.numel() == 0:
        return values.clone()
    _, gid = torch.unique(group_ids, return_inverse=True)
    n_groups = int(gid.max()) + 1
    v = values.detach().to(torch.float64)
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gid, torch.ones_like(v))
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gid, v)
    mean = total / count
    n = count[gid]
    if leave_one_out:
        # Mean of the other samples; a lone sample is its own baseline (advantage 0).
        baseline = torch.where(n > 1, (total[gid] - v) / (n - 1).clamp(min=1), v)
    else:
        baseline = mean[gid]
    adv = v - baseline
    if norm == "std":
        sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gid, (v - mean[gid]) ** 2)
        std = torch.sqrt(sq / (count - 1).clamp(min=1))
        adv = adv / (std[gid] + eps)
    return adv.to(values.dtype)


@dataclass
class RolloutAdvantages:
    task: torch.Tensor  # [N] advantages for the w_rl term (reward mode: task reward + coef * score)
    adversarial: torch.Tensor  # [N] advantages for the lambda_adv term (zeros when it is off)


def rollout_advantages(
    group_ids: torch.Tensor,
    weights: StepWeights,
    cfg: ObjectiveConfig,
    task_rewards: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> RolloutAdvantages:
    """Both advantage vectors of a step's rollouts, as the step's weights ask for them.

    ``task_rewards`` [N] are the verifiable rewards, ``scores`` [N] the discriminator's; each is
    needed only when the step uses it. Group normalisation follows ``cfg.adv_norm``,
    ``cfg.adv_leave_one_out`` and ``cfg.adv_eps`` for both.
    """
    _check_1d("group_ids", group_ids)
    n = group_ids.numel()
    if weights.use_task_reward and task_rewards is None:
        raise ValueError(f"rollout_advantages: stage {weights.stage!r} uses the task reward; pass task_rewards")
    if weights.needs_discriminator and scores is None:
        raise ValueError(f"rollout_advantages: stage {weights.stage!r} uses the discriminator; pass scores")
    if task_rewards is not None:
        _check_1d("task_rewards", task_rewards, n)
    if scores is not None:
        _check_1d("scores", scores, n)

    def adv(values: torch.Tensor) -> torch.Tensor:
        return group_advantages(
            values, group_ids, norm=cfg.adv_norm, leave_one_out=cfg.adv_leave_one_out, eps=cfg.adv_eps
        )

    zeros = torch.zeros(n, dtype=torch.float32)
    reward = None
    if weights.use_task_reward:
        reward = task_rewards.to(torch.float32)
    if weights.adv_reward_coef > 0:
        extra = weights.adv_reward_coef * scores.to(torch.float32)
        reward = extra if reward is None else reward + extra
    task = adv(reward) if reward is not None else zeros
    adversarial = adv(scores.to(torch.float32)) if weights.lambda_adv > 0 else zeros.clone()
    return RolloutAdvantages(task=task, adversarial=adversarial)
