"""Global counts of a step and the per-token weights that turn a loss into a global mean.

The contract (DESIGN.md, "Loss normalisation"): every term of a micro-batch is divided by the
count of the *whole optimizer step* (all micro-batches, all data-parallel ranks), so that
summing the micro-batch contributions over micro-batches and ranks gives the step's loss and
gradient exactly, whatever the micro-batch count or DP size.

Demonstrations and rollouts are two populations with their own counts, because each term is
a mean over its own data (the SFT mean over demo tokens, the policy-gradient mean over
rollout tokens). A sequence counts when it has at least one trained token.

Every aggregation mode is a weighted token sum ``sum_t value_t * weight_t``; the weights are

- ``token-mean``:              mask_t / N_tokens
- ``seq-mean-token-mean``:     mask_t / (len_s(t) * N_seqs)
- ``seq-mean-token-sum-norm``: mask_t / (L * N_seqs)        (Dr.GRPO; L = agg_norm_length)

where ``len_s`` is the number of trained tokens of the token's sequence, and the N are global.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Protocol

import torch
import torch.distributed as dist

from uniapl_megatron.distributed import collective_device


class CountableBatch(Protocol):
    """What the counts need from a micro-batch (LossInputs has it; so can a packed batch)."""

    loss_mask: torch.Tensor  # [T] 1 for trained tokens
    seq_ids: torch.Tensor  # [T] local sequence index, -1 for tokens of no sequence (padding)
    is_demo: torch.Tensor  # [S] True for demonstrations, False for rollouts
    seq_token_counts: torch.Tensor | None  # [S] full trained-token count per sequence, or None


@dataclass
class GlobalCounts:
    """Trained tokens and sequences of a whole optimizer step, per population."""

    demo_tokens: float = 0.0
    demo_seqs: float = 0.0
    rollout_tokens: float = 0.0
    rollout_seqs: float = 0.0

    def __add__(self, other: "GlobalCounts") -> "GlobalCounts":
        return GlobalCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def all_reduce(
        self, group: dist.ProcessGroup | None = None, seq_group: dist.ProcessGroup | None = None
    ) -> "GlobalCounts":
        """Token counts summed over ``group``, sequence counts over ``seq_group`` (default: ``group``).

        torch.distributed must be initialised; ``None`` means the default (world) group.
        """
        tokens = _sum_over([self.demo_tokens, self.rollout_tokens], group)
        seqs = _sum_over([self.demo_seqs, self.rollout_seqs], seq_group if seq_group is not None else group)
        return GlobalCounts(demo_tokens=tokens[0], demo_seqs=seqs[0], rollout_tokens=tokens[1], rollout_seqs=seqs[1])


def _sum_over(values: list[float], group: dist.ProcessGroup | None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [float(x) for x in t.cpu().tolist()]


def trained_token_mask(batch: CountableBatch) -> torch.Tensor:
    """[T] bool: tokens that are trained and belong to a sequence."""
    return (batch.loss_mask > 0) & (batch.seq_ids >= 0)


def per_token(values: torch.Tensor, seq_ids: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
    """Per-sequence values [S] -> [T], each token getting its sequence's value and ``fill`` where it belongs
    to no sequence (seq id -1). A micro-batch may hold no sequence at all (S = 0: the filler of a rank with
    fewer sequences than micro-batches); every token then gets ``fill``."""
    if values.numel() == 0:
        return torch.full(seq_ids.shape, fill, dtype=values.dtype, device=seq_ids.device)
    out = values.to(seq_ids.device)[seq_ids.clamp(min=0)]
    return torch.where(seq_ids >= 0, out, torch.full_like(out, fill))


def sequence_lengths(batch: CountableBatch) -> torch.Tensor:
    """[S] trained tokens per sequence: the given full counts, else counted in this micro-batch.

    Give ``seq_token_counts`` when a sequence's tokens are split over ranks (context parallel),
    so that seq-mean-token-mean divides by the whole sequence's length.
    """
    if batch.seq_token_counts is not None:
        return batch.seq_token_counts.to(device=batch.seq_ids.device, dtype=torch.float64)
    valid = trained_token_mask(batch)
    sid = batch.seq_ids.clamp(min=0)
    n_seq = batch.is_demo.numel()
    return torch.zeros(n_seq, dtype=torch.float64, device=sid.device).index_add_(
        0, sid[valid], torch.ones(int(valid.sum()), dtype=torch.float64, device=sid.device)
    )


def local_counts(batch: CountableBatch) -> GlobalCounts:
    """Counts of one micro-batch."""
    valid = trained_token_mask(batch)
    demo_seq = batch.is_demo.to(valid.device).bool()
    demo_tok = per_token(demo_seq, batch.seq_ids, False) & valid
    has_tokens = sequence_lengths(batch) > 0
    return GlobalCounts(
        demo_tokens=float(demo_tok.sum()),
        demo_seqs=float((has_tokens & demo_seq).sum()),
        rollout_tokens=float((valid & ~demo_tok).sum()),
        rollout_seqs=float((has_tokens & ~demo_seq).sum()),
    )


def step_counts(
    micro_batches: Iterable[CountableBatch],
    group: dist.ProcessGroup | None = None,
    seq_group: dist.ProcessGroup | None = None,
) -> GlobalCounts:
    """Counts of a whole optimizer step: summed over this rank's micro-batches, then over ranks.

    ``group``: the ranks whose tokens together make up the step (the data-parallel group, or
    data x context parallel); ``None`` means one rank and no communication. ``seq_group``: the
    ranks holding *different* sequences, when that differs from ``group``: with context
    parallelism every context-parallel rank holds a slice of the same sequences, so pass the
    data-parallel group here (and give ``seq_token_counts``, the full lengths, in the batches).
    """
    total = GlobalCounts()
    for mb in micro_batches:
        total = total + local_counts(mb)
    if group is not None:
        total = total.all_reduce(group, seq_group)
    return total


def token_weights(
    batch: CountableBatch, counts: GlobalCounts, *, demos: bool, mode: str, norm_length: int | None = None
) -> torch.Tensor:
    """[T] weights such that ``(values * weights).sum()`` is this micro-batch's share of the
    step's global mean of ``values`` over one population (demos or rollouts) in ``mode``.
    """
    valid = trained_token_mask(batch)
    in_pop = valid & (per_token(batch.is_demo.bool(), batch.seq_ids, False) == demos)
    n_tok = counts.demo_tokens if demos else counts.rollout_tokens
    n_seq = counts.demo_seqs if demos else counts.rollout_seqs
    dtype = torch.float32
    if mode == "token-mean":
        if n_tok <= 0:
            return torch.zeros(in_pop.shape, dtype=dtype, device=in_pop.device)
        return in_pop.to(dtype) / n_tok
    if n_seq <= 0:
        return torch.zeros(in_pop.shape, dtype=dtype, device=in_pop.device)
    if mode == "seq-mean-token-mean":
        lengths = per_token(sequence_lengths(batch), batch.seq_ids).clamp(min=1)
        return (in_pop.to(torch.float64) / (lengths * n_seq)).to(dtype)
    if mode == "seq-mean-token-sum-norm":
        if norm_length is None or norm_length < 1:
            raise ValueError("token_weights: mode 'seq-mean-token-sum-norm' needs norm_length >= 1")
        return in_pop.to(dtype) / (float(norm_length) * n_seq)
    raise ValueError(f"token_weights: unknown aggregation mode {mode!r}")
