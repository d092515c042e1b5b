"""Sequence packing (thd layout) and micro-batch planning by token budget over data-parallel ranks."""

from __future__ import annotations

import random

import pytest
import torch

from uniapl_megatron.data import DataError, pack_rank, pack_sequences, plan_micro_batches, required_pad_multiple


def random_seqs(n: int, seed: int, max_len: int = 60) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    seqs, prompts = [], []
    for _ in range(n):
        length = rng.randint(2, max_len)
        seqs.append([rng.randint(1, 1000) for _ in range(length)])
        prompts.append(rng.randint(1, length))  # prompt_len == length: an empty response
    return seqs, prompts


@pytest.mark.parametrize("pad_multiple", [1, 4])
def test_pack_unpack_round_trip_and_layout(pad_multiple):
    seqs, prompts = random_seqs(9, seed=pad_multiple)
    b = pack_sequences(seqs, prompts, pad_multiple=pad_multiple, pad_id=0, seq_ids=range(10, 19))
    lens = [len(s) for s in seqs]
    padded = [-(-n // pad_multiple) * pad_multiple for n in lens]
    # cu_seqlens: int32, real lengths; cu_seqlens_padded: the row offsets.
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens_padded.dtype == torch.int32
    assert b.cu_seqlens.tolist() == [sum(lens[:i]) for i in range(len(lens) + 1)]
    assert b.cu_seqlens_padded.tolist() == [sum(padded[:i]) for i in range(len(lens) + 1)]
    # No padding beyond the alignment.
    assert b.num_tokens == sum(padded) and b.max_seqlen == max(padded)
    if pad_multiple == 1:
        assert b.num_tokens == sum(lens) and (b.seq_index >= 0).all()
    assert int((b.seq_index < 0).sum()) == sum(padded) - sum(lens)
    # Round trip.
    assert [t.tolist() for t in b.unpack(b.input_ids)] == seqs
    assert [t.tolist() for t in b.unpack(b.position_ids)] == [list(range(n)) for n in lens]
    assert [t.tolist() for t in b.unpack(b.seq_index)] == [[i] * n for i, n in enumerate(lens)]
    assert b.seq_ids == list(range(10, 19))
    for s, p, lab, m in zip(seqs, prompts, b.unpack(b.labels), b.unpack(b.loss_mask)):
        assert lab[:-1].tolist() == s[1:]  # next token, never crossing into the next sequence
        assert m.tolist() == [0.0] * (p - 1) + [1.0] * (len(s) - p) + [0.0]
    # Response-aligned values: the targets under the mask are exactly the response tokens.
    assert [t.tolist() for t in b.unpack_response(b.labels)] == [s[p:] for s, p in zip(seqs, prompts)]
    assert b.num_loss_tokens == sum(len(s) - p for s, p in zip(seqs, prompts))
    # Per-response-token values in, same values out, mask-shaped.
    values = [torch.randn(len(s) - p) for s, p in zip(seqs, prompts)]
    scattered = b.scatter_response(values)
    assert all(torch.equal(x, y) for x, y in zip(b.unpack_response(scattered), values))
    assert torch.equal(scattered != 0, b.loss_mask.bool())
    # Per-sequence values spread over the tokens (advantages), zero on padding.
    adv = torch.arange(1.0, len(seqs) + 1)
    spread = b.per_token(adv)
    assert [t.tolist() for t in b.unpack(spread)] == [[float(i + 1)] * n for i, n in enumerate(lens)]
    assert float(spread[0][b.seq_index < 0].abs().sum()) == 0.0


def test_packed_seq_params_and_pad_multiple():
    b = pack_sequences([[1, 2, 3], [4, 5]], [1, 1], pad_multiple=4)
    p = b.to_packed_seq_params()
    assert p.qkv_format == "thd" and p.cu_seqlens_q.tolist() == [0, 3, 5]
    assert p.cu_seqlens_q_padded.tolist() == [0, 4, 8] and p.max_seqlen_q == 4
    assert pack_sequences([[1, 2]], [1]).to_packed_seq_params().cu_seqlens_q_padded is None
    assert required_pad_multiple() == 1
    assert required_pad_multiple(tp_size=2, sequence_parallel=True) == 2
    assert required_pad_multiple(tp_size=2, cp_size=2, sequence_parallel=True) == 8
    assert required_pad_multiple(tp_size=4, cp_size=2) == 4


def test_row_padding_pads_the_row_not_each_sequence():
    """row_multiple (FP8's per-row token multiple) pads the row once, in its last sequence: every real token,
    label, loss position and response slot is where per-sequence padding alone puts it."""
    seqs, prompts = random_seqs(7, seed=5)
    ref = pack_sequences(seqs, prompts, pad_multiple=2)
    b = pack_sequences(seqs, prompts, pad_multiple=2, row_multiple=16)
    assert b.num_tokens % 16 == 0 and ref.num_tokens <= b.num_tokens < ref.num_tokens + 16
    assert b.cu_seqlens_padded[:-1].tolist() == ref.cu_seqlens_padded[:-1].tolist()
    assert b.cu_seqlens.tolist() == ref.cu_seqlens.tolist() and b.num_loss_tokens == ref.num_loss_tokens
    n = ref.num_tokens
    for k in ("input_ids", "labels", "loss_mask", "position_ids"):
        assert torch.equal(getattr(b, k)[:, :n], getattr(ref, k)), k
    assert b.loss_mask[:, n:].sum() == 0 and (b.seq_index[n:] == -1).all()
    # Per-sequence padding to the same multiple costs more than the row's.
    assert b.num_tokens < pack_sequences(seqs, prompts, pad_multiple=16).num_tokens
    # A filler row is one row multiple; lcm with the sequences' multiple.
    assert pack_sequences([], [], pad_multiple=4, row_multiple=6).num_tokens == 12
    # The planner keeps each padded row within the budget (1000 rounds down to 992 sequence tokens per row).
    lens = [len(s) for s in random_seqs(60, seed=6, max_len=300)[0]]
    plan = plan_micro_batches(lens, max_tokens=1000, dp_size=2, pad_multiple=2, row_multiple=32)
    assert plan.row_multiple == 32
    for r in range(2):
        for t, mb in zip(plan.tokens[r], pack_rank(plan, r, [[1] * n for n in lens], [1] * len(lens), pad_id=0)):
            assert mb.is_filler or mb.num_tokens == t <= 1000 and t % 32 == 0
    with pytest.raises(DataError, match=r"995 tokens \(996 aligned to 2; 1024 in a row padded to a multiple of 32\)"):
        plan_micro_batches([995], max_tokens=1000, pad_multiple=2, row_multiple=32)


def test_filler_and_bad_inputs():
    f = pack_sequences([], [], pad_multiple=4, pad_id=7)
    assert f.is_filler and f.num_tokens == 4 and f.num_loss_tokens == 0 and f.unpack(f.input_ids) == []
    assert f.input_ids.tolist() == [[7] * 4] and f.per_token(torch.zeros(0)).shape == (1, 4)
    with pytest.raises(DataError, match="sequence 1: prompt length 0"):
        pack_sequences([[1, 2], [3, 4]], [1, 0])
    b = pack_sequences([[1, 2, 3]], [1])
    with pytest.raises(ValueError, match="sequence 0 has 2 response tokens"):
        b.scatter_response([torch.zeros(3)])


@pytest.mark.parametrize("dp_size,pad_multiple,seed", [(1, 1, 0), (2, 1, 1), (4, 2, 2), (3, 8, 3)])
def test_micro_batches_keep_the_budget_and_balance_ranks(dp_size, pad_multiple, seed):
    seqs, prompts = random_seqs(97, seed=seed, max_len=300)
    lens = [len(s) for s in seqs]
    budget = 1024
    plan = plan_micro_batches(lens, max_tokens=budget, dp_size=dp_size, pad_multiple=pad_multiple)
    # Every sequence exactly once.
    assigned = sorted(i for rank in plan.ranks for mb in rank for i in mb)
    assert assigned == list(range(len(seqs)))
    # Same number of micro-batches per rank, each within budget.
    assert {len(r) for r in plan.ranks} == {plan.micro_batches_per_rank}
    total = sum(-(-n // pad_multiple) * pad_multiple for n in lens)
    lower_bound = -(-total // budget)  # no plan can use fewer micro-batches
    assert plan.micro_batches_per_rank * dp_size < lower_bound + 2 * dp_size
    for r in range(dp_size):
        batches = pack_rank(plan, r, seqs, prompts, pad_id=0)
        assert len(batches) == plan.micro_batches_per_rank
        for mb, b, tokens in zip(plan.ranks[r], batches, plan.tokens[r]):
            assert b.num_tokens == tokens <= budget
            assert b.seq_ids == mb and [t.tolist() for t in b.unpack(b.input_ids)] == [seqs[i] for i in mb]
    # Ranks within a few percent of each other, and never further apart than one sequence.
    assert plan.imbalance < 0.05, plan.summary()
    assert max(plan.rank_tokens) - min(plan.rank_tokens) <= max(lens) + pad_multiple
    assert plan.summary()["rank_tokens"] == plan.rank_tokens and sum(plan.rank_tokens) == total


def test_dp_balance_on_a_hand_checked_case():
    # FFD needs 3 micro-batches -> 2 per rank; the even split is {1000 | 500} and {600 + 400 | 300 + 200}.
    plan = plan_micro_batches([1000, 600, 500, 400, 300, 200], max_tokens=1000, dp_size=2)
    assert plan.rank_tokens == [1500, 1500] and plan.imbalance == 0.0
    assert sorted(sorted(i for mb in r for i in mb) for r in plan.ranks) == [[0, 2], [1, 3, 4, 5]]
    # Granularity limits balance: five near-full sequences on four ranks leave one rank with two.
    plan = plan_micro_batches([950] * 5 + [300, 300, 50], max_tokens=1000, dp_size=4)
    assert sorted(plan.rank_tokens) == [1000, 1250, 1250, 1900]


def test_micro_batch_edge_cases():
    # Fewer sequences than micro-batches: fillers keep the micro-batch count equal on every rank.
    plan = plan_micro_batches([900, 900, 900], max_tokens=1000, dp_size=2)
    assert plan.micro_batches_per_rank == 2 and plan.summary()["filler_micro_batches"] == 1
    packed = [pack_rank(plan, r, [[1] * 900] * 3, [1] * 3, pad_id=0) for r in range(2)]
    assert sorted(b.is_filler for r in packed for b in r) == [False, False, False, True]
    # At least min_micro_batches per rank (pipeline parallelism).
    assert plan_micro_batches([10] * 8, max_tokens=1000, dp_size=2, min_micro_batches=3).micro_batches_per_rank == 3
    # A multiple of micro_batch_multiple per rank (the interleaved pipeline schedule's groups of PP): 3 by
    # budget become 4, and one sequence alone gets a filler beside it.
    assert plan_micro_batches([600] * 3, max_tokens=1000, micro_batch_multiple=2).micro_batches_per_rank == 4
    one = plan_micro_batches([10], max_tokens=1000, micro_batch_multiple=2)
    assert one.ranks == [[[0], []]] and one.summary()["filler_micro_batches"] == 1
    # A sequence over the budget is a clear error.
    with pytest.raises(DataError, match="sequence 1 has 1001 tokens .*max_tokens_per_micro_batch=1000"):
        plan_micro_batches([5, 1001], max_tokens=1000)
    with pytest.raises(DataError, match="1000 tokens \\(1008 aligned to 16\\)"):
        plan_micro_batches([1000], max_tokens=1000, pad_multiple=16)
    # Deterministic: same input, same plan.
    lens = [len(s) for s in random_seqs(40, seed=9, max_len=200)[0]]
    a = plan_micro_batches(lens, max_tokens=512, dp_size=2)
    assert a == plan_micro_batches(lens, max_tokens=512, dp_size=2)
