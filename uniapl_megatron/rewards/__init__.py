"""Rewards: the ``Reward`` protocol, a registry (``build_reward("ifeval", {...})``), and the
IFEval-checker reward. Training-prompt generation lives in ``prompts``, the demo's tiny task
family in ``synthetic``."""

from uniapl_megatron.rewards.base import (
    PromptRowError,
    Reward,
    RewardBase,
    RewardConfigError,
    available_rewards,
    build_reward,
    register_reward,
)
from uniapl_megatron.rewards.ifeval import IFEvalReward, IFEvalRewardConfig, InstructionChecker

__all__ = [
    "IFEvalReward",
    "IFEvalRewardConfig",
    "InstructionChecker",
    "PromptRowError",
    "Reward",
    "RewardBase",
    "RewardConfigError",
    "available_rewards",
    "build_reward",
    "register_reward",
]
