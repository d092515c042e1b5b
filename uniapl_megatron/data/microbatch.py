"""Micro-batches of a step by token budget, balanced over data-parallel ranks.

Plan: count the micro-batches first-fit-decreasing needs under the budget (k), give every rank
m = ceil(k / dp) of them, spread the sequences over the dp*m micro-batches longest first, each into
the least-filled one (if one no longer fits, m grows by one), then deal the micro-batches to the
ranks, fullest first, each to the rank with the fewest tokens that still has room, and finally move
or swap single sequences between the heaviest and the lightest rank while that narrows their gap.
Every rank runs the same number of micro-batches; token totals per rank come out close (`imbalance`
says how close; a few near-budget sequences on many ranks can keep it high).
Everything is deterministic: every rank computes the same plan from the same lengths.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Sequence

from uniapl_megatron.data.packing import PackedBatch, aligned_length, pack_sequences
from uniapl_megatron.data.report import DataError


@dataclass
class MicroBatchPlan:
    ranks: list[list[list[int]]]  # ranks[r][j]: indices of the sequences of rank r's micro-batch j
    tokens: list[list[int]]  # tokens (aligned lengths) of each of those micro-batches
    max_tokens: int  # the budget each micro-batch keeps to
    pad_multiple: int  # each sequence's length multiple
    row_multiple: int = 1  # each packed row's length multiple (see packing.pack_sequences)

    @property
    def dp_size(self) -> int:
        return len(self.ranks)

    @property
    def micro_batches_per_rank(self) -> int:
        return len(self.ranks[0])

    @property
    def rank_tokens(self) -> list[int]:
        return [sum(t) for t in self.tokens]

    @property
    def imbalance(self) -> float:
        """Most tokens on one rank over the mean, minus 1 (0.0 = perfectly even)."""
        totals = self.rank_tokens
        mean = sum(totals) / len(totals)
        return max(totals) / mean - 1.0 if mean else 0.0

    def summary(self) -> dict[str, Any]:
        used = sum(self.rank_tokens)
        return {
            "dp_size": self.dp_size,
            "micro_batches_per_rank": self.micro_batches_per_rank,
            "max_tokens_per_micro_batch": self.max_tokens,
            "rank_tokens": self.rank_tokens,
            "imbalance": round(self.imbalance, 4),
            "budget_fill": round(used / (self.dp_size * self.micro_batches_per_rank * self.max_tokens), 4),
            "filler_micro_batches": sum(1 for r in self.ranks for mb in r if not mb),
        }


def plan_micro_batches(
    lengths: Sequence[int],
    *,
    max_tokens: int,
    dp_size: int = 1,
    pad_multiple: int = 1,
    min_micro_batches: int = 1,
    micro_batch_multiple: int = 1,
    row_multiple: int = 1,
) -> MicroBatchPlan:
    """Assign sequences (their token counts) to dp_size ranks x m micro-batches of <= max_tokens each.

    row_multiple: each packed row is padded to a multiple of lcm(pad_multiple, row_multiple), so the sequences
    of one micro-batch keep to max_tokens rounded down to that multiple (then the padded row fits max_tokens).

    min_micro_batches: at least this many per rank (pipeline parallelism wants >= pp_size).
    micro_batch_multiple: m is a multiple of this (the interleaved pipeline schedule runs groups of pp_size).
    A rank may get an empty micro-batch when there are fewer sequences than micro-batches; pack it
    as a filler (pack_sequences of nothing) so that every rank steps the same number of times.
    """
    if min(dp_size, max_tokens, pad_multiple, min_micro_batches, micro_batch_multiple, row_multiple) < 1:
        raise ValueError(
            f"plan_micro_batches: dp_size={dp_size}, max_tokens={max_tokens}, "
            f"pad_multiple={pad_multiple}, min_micro_batches={min_micro_batches}, "
            f"micro_batch_multiple={micro_batch_multiple}, row_multiple={row_multiple} must all be >= 1"
        )
    row = math.lcm(pad_multiple, row_multiple)
    budget = max_tokens // row * row
    sizes = [aligned_length(int(n), pad_multiple) for n in lengths]
    for i, s in enumerate(sizes):
        if s > budget:
            in_row = f"; {aligned_length(s, row)} in a row padded to a multiple of {row}" if row > pad_multiple else ""
            raise DataError(
                f"sequence {i} has {lengths[i]} tokens ({s} aligned to {pad_multiple}{in_row}), more than "
                f"the micro-batch budget data.max_tokens_per_micro_batch={max_tokens}"
            )
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    need = -(-_first_fit_count(order, sizes, budget) // dp_size)
    per_rank = aligned_length(max(min_micro_batches, need), micro_batch_multiple)
    members, loads, per_rank = _fill_micro_batches(order, sizes, budget, per_rank, dp_size, micro_batch_multiple)
    rank_bins = _deal_to_ranks(loads, dp_size, per_rank)
    if dp_size > 1:
        _rebalance(rank_bins, members, loads, sizes, budget)
    return MicroBatchPlan(
        ranks=[[sorted(members[b]) for b in bins] for bins in rank_bins],
        tokens=[[aligned_length(loads[b], row) for b in bins] for bins in rank_bins],
        max_tokens=max_tokens,
        pad_multiple=pad_multiple,
        row_multiple=row_multiple,
    )


def _first_fit_count(order: list[int], sizes: list[int], budget: int) -> int:
    """How many micro-batches the budget needs at all: first-fit-decreasing over `order` (longest first)."""
    ffd: list[int] = []
    for i in order:
        for b, load in enumerate(ffd):
            if load + sizes[i] <= budget:
                ffd[b] += sizes[i]
                break
        else:
            ffd.append(sizes[i])
    return len(ffd)


def _fill_micro_batches(
    order: list[int], sizes: list[int], budget: int, per_rank: int, dp_size: int, step: int
) -> tuple[list[list[int]], list[int], int]:
    """(members, token loads, micro-batches per rank): longest first into the least-filled micro-batch, which
    balances them; when one stops fitting, try again with `step` more micro-batches per rank."""
    while True:
        heap = [(0, b) for b in range(per_rank * dp_size)]
        members: list[list[int]] = [[] for _ in heap]
        loads = [0] * len(heap)
        for i in order:
            load, b = heapq.heappop(heap)
            if load + sizes[i] > budget:
                break
            members[b].append(i)
            loads[b] = load + sizes[i]
            heapq.heappush(heap, (loads[b], b))
        else:
            return members, loads, per_rank
        per_rank += step


def _deal_to_ranks(loads: list[int], dp_size: int, per_rank: int) -> list[list[int]]:
    """Micro-batch indices per rank: fullest first, to the rank with the fewest tokens and room left."""
    rank_bins: list[list[int]] = [[] for _ in range(dp_size)]
    totals = [0] * dp_size
    for b in sorted(range(len(loads)), key=lambda b: (-loads[b], b)):
        r = min((r for r in range(dp_size) if len(rank_bins[r]) < per_rank), key=lambda r: (totals[r], r))
        rank_bins[r].append(b)
        totals[r] += loads[b]
    return rank_bins


def _rebalance(
    rank_bins: list[list[int]],
    members: list[list[int]],
    loads: list[int],
    sizes: list[int],
    max_tokens: int,
    max_rounds: int = 64,
) -> None:
    """Narrow the gap between the heaviest and the lightest rank by moving one sequence, or swapping two,
    between their micro-batches (within the budget, never emptying one). Each move lowers the sum of
    squared rank totals, so this ends; max_rounds bounds the time on very large steps."""
    for _ in range(max_rounds):
        totals = [sum(loads[b] for b in bins) for bins in rank_bins]
        hi = max(range(len(totals)), key=lambda r: (totals[r], -r))
        lo = min(range(len(totals)), key=lambda r: (totals[r], r))
        gap = totals[hi] - totals[lo]
        best: tuple[int, int, int, int, int | None] | None = None  # (new gap, from bin, seq, to bin, swapped seq)
        for bh in rank_bins[hi]:
            for i in members[bh]:
                for bl in rank_bins[lo]:
                    if len(members[bh]) > 1 and sizes[i] < gap and loads[bl] + sizes[i] <= max_tokens:
                        cand = (abs(gap - 2 * sizes[i]), bh, i, bl, None)
                        best = cand if best is None or cand[0] < best[0] else best
                    for j in members[bl]:
                        d = sizes[i] - sizes[j]
                        if 0 < d < gap and loads[bl] + d <= max_tokens:
                            cand = (abs(gap - 2 * d), bh, i, bl, j)
                            best = cand if best is None or cand[0] < best[0] else best
        if best is None:
            return
        _, bh, i, bl, j = best
        members[bh].remove(i)
        members[bl].append(i)
        loads[bh] -= sizes[i]
        loads[bl] += sizes[i]
        if j is not None:
            members[bl].remove(j)
            members[bh].append(j)
            loads[bl] -= sizes[j]
            loads[bh] += sizes[j]


def pack_rank(
    plan: MicroBatchPlan, rank: int, token_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_id: int
) -> list[PackedBatch]:
    """Rank `rank`'s packed micro-batches; seq_ids index the step's full lists (token_ids, prompt_lens)."""
    if not 0 <= rank < plan.dp_size:
        raise ValueError(f"pack_rank: rank {rank} outside the plan's {plan.dp_size} ranks")
    return [
        pack_sequences(
            [token_ids[i] for i in mb],
            [prompt_lens[i] for i in mb],
            pad_multiple=plan.pad_multiple,
            pad_id=pad_id,
            seq_ids=mb,
            row_multiple=plan.row_multiple,
        )
        for mb in plan.ranks[rank]
    ]
