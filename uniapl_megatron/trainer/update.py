"""One optimizer update of the student on a list of sequences: this data-parallel rank's share packed into micro-
batches, the step's global token / sequence counts, the objective's forward and backward, the optimizer step, and
the update's metrics summed over ranks. The trainer's step (Trainer.update) and the test workers run this one path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..objective import (
    GlobalCounts,
    ObjectiveConfig,
    StepWeights,
    metric_names,
    objective_loss,
    step_counts,
    sum_metrics,
)
from ..objective.losses import Metrics
from .batch import Seq, pack_for_rank, set_token_temperatures
from .student import MicroBatch, Student

OPTIMIZER_METRICS = ("grad_norm", "lr", "skipped")
"""Metrics of the optimizer step, the same on every rank (the others are the loss's, summed over ranks)."""


def global_counts(mbs: list[MicroBatch], dp_group: dist.ProcessGroup | None) -> GlobalCounts:
    """Trained tokens / sequences of the whole optimizer step, over all micro-batches and DP ranks."""
    return step_counts([mb.inputs for mb in mbs], group=dp_group)


def make_loss_fn(
    weights: StepWeights, counts: GlobalCounts, cfg: ObjectiveConfig
) -> Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, Metrics]]:
    """The objective on one micro-batch, as Student.train_step calls it with the head's output ([T] log-probs,
    or [T, 2] log-probs and entropy)."""

    def fn(mb: MicroBatch, out: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        logprobs, entropy = (out[:, 0], out[:, 1]) if out.dim() == 2 else (out, None)
        loss, metrics = objective_loss(mb.inputs.with_outputs(logprobs, entropy), weights, cfg, counts)
        metrics["loss/total"] = loss.detach()
        return loss, metrics

    return fn


def reduce_metrics(metrics: dict[str, float], keys: list[str]) -> dict[str, float]:
    """Collective: one update's metrics, the same on every rank. The loss's ``keys`` live on the last pipeline
    stage, once per tensor-parallel group, and are summed over the ranks holding them (data x context
    parallel); the optimizer's are every rank's own."""
    from megatron.core import parallel_state as ps

    holds = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    mine = [{k: v for k, v in metrics.items() if k not in OPTIMIZER_METRICS}] if holds else []
    out = sum_metrics(mine, group=dist.group.WORLD, keys=keys)
    out.update({k: metrics[k] for k in OPTIMIZER_METRICS})
    return out


@dataclass
class PolicyUpdate:
    """Packs sequences for this rank and runs one optimizer update of ``student`` on them."""

    student: Student
    objective: ObjectiveConfig
    max_tokens: int
    """Token budget of a packed micro-batch (data.max_tokens_per_micro_batch)."""
    pad_multiple: int = 1
    """Each sequence padded to a multiple of this (raised to what the layout needs)."""
    pad_id: int = 0
    temperature: float = 1.0
    """The sampler's temperature: rollout tokens' log-probs are taken at it, demonstrations' at 1."""
    fp8_recipe: str = "none"
    """model.fp8: each packed row is also padded for this recipe's GEMMs."""

    def pack(self, seqs: list[Seq], temperature: float | None = None) -> list[MicroBatch]:
        """This data-parallel rank's micro-batches of ``seqs`` (the same global list on every rank), with rollout
        tokens at ``temperature`` (default: the sampler's)."""
        from megatron.core import parallel_state as ps

        mbs = pack_for_rank(
            seqs,
            self.max_tokens,
            self.student.parallel,
            max(self.pad_multiple, 1),
            ps.get_data_parallel_rank(),
            ps.get_data_parallel_world_size(),
            self.pad_id,
            fp8_recipe=self.fp8_recipe,
        )
        return set_token_temperatures(mbs, self.temperature if temperature is None else temperature)

    def __call__(self, seqs: list[Seq], weights: StepWeights) -> dict[str, float]:
        """Collective: one optimizer update on ``seqs`` with the objective's ``weights``; the update's metrics."""
        from megatron.core import parallel_state as ps

        mbs = self.pack(seqs)
        counts = global_counts(mbs, ps.get_data_parallel_group())
        metrics = self.student.train_step(
            mbs,
            make_loss_fn(weights, counts, self.objective),
            self.temperature,
            with_entropy=self.objective.entropy_coef > 0,
        )
        return reduce_metrics(metrics, metric_names(weights, self.objective))
