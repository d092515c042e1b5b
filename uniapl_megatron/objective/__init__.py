"""The UniAPL objective: loss terms, global-count aggregation, advantages and algorithm presets."""

from uniapl_megatron.objective.advantages import RolloutAdvantages, group_advantages, rollout_advantages
from uniapl_megatron.objective.aggregation import GlobalCounts, local_counts, step_counts, token_weights
from uniapl_megatron.objective.config import ALGORITHMS, ObjectiveConfig, ObjectiveConfigError
from uniapl_megatron.objective.losses import (
    LossInputs,
    metric_names,
    objective_loss,
    seq_ids_from_cu_seqlens,
    sum_metrics,
)
from uniapl_megatron.objective.presets import RunNeeds, StepWeights, mu_at, resolve_weights, run_needs

__all__ = [
    "ALGORITHMS",
    "GlobalCounts",
    "LossInputs",
    "ObjectiveConfig",
    "ObjectiveConfigError",
    "RolloutAdvantages",
    "RunNeeds",
    "StepWeights",
    "group_advantages",
    "local_counts",
    "metric_names",
    "mu_at",
    "objective_loss",
    "resolve_weights",
    "rollout_advantages",
    "run_needs",
    "seq_ids_from_cu_seqlens",
    "step_counts",
    "sum_metrics",
    "token_weights",
]
