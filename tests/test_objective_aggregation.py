"""The step's loss and gradient do not change with the micro-batch count or the DP size.

A toy policy (logits = features @ W) gives the log-probs of a mixed step of demonstrations
and rollouts of uneven lengths; the loss is summed over micro-batches (and, for DP, the
gradient all-reduced over 2 gloo processes) and compared with the one-micro-batch step.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from uniapl_megatron.objective import (
    LossInputs,
    ObjectiveConfig,
    metric_names,
    objective_loss,
    resolve_weights,
    step_counts,
    sum_metrics,
)

D, V = 6, 11  # feature size, vocabulary


def _toy_step(seed: int = 0) -> list[dict]:
    """Eight sequences (3 demos, 5 rollouts in 2 groups), lengths 3..14, prompts 1..3 tokens."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(8):
        n = int(torch.randint(3, 15, (1,), generator=g))
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        seqs.append(
            dict(
                x=torch.randn(n, D, generator=g),
                y=torch.randint(0, V, (n,), generator=g),
                mask=(torch.arange(n) >= prompt).long(),
                demo=i < 3,
                adv=float(torch.randn(1, generator=g)),
                adv2=float(torch.randn(1, generator=g)),
                # offsets of old / reference / engine log-probs from the current ones
                old=torch.randn(n, generator=g) * 0.5,
                ref=torch.randn(n, generator=g) * 0.3,
                engine=torch.randn(n, generator=g) * 0.5,
            )
        )
    return seqs


def _filler(weight: torch.Tensor) -> LossInputs:
    """A micro-batch with no sequence (a rank with fewer sequences than micro-batches): two padding tokens."""
    logp_all = torch.log_softmax(torch.zeros(2, D) @ weight, dim=-1)
    logprobs, none = logp_all[:, 0], torch.zeros(0)
    return LossInputs(
        logprobs=logprobs,
        loss_mask=torch.zeros(2, dtype=torch.long),
        seq_ids=torch.full((2,), -1),
        is_demo=torch.zeros(0, dtype=torch.bool),
        advantages=none,
        adv_advantages=none,
        old_logprobs=logprobs.detach(),
        ref_logprobs=logprobs.detach(),
        engine_logprobs=logprobs.detach(),
        entropy=-(logp_all.exp() * logp_all).sum(-1),
    )


def _pack(seqs: list[dict], weight: torch.Tensor) -> LossInputs:
    if not seqs:
        return _filler(weight)
    x = torch.cat([s["x"] for s in seqs])
    y = torch.cat([s["y"] for s in seqs])
    logits = x @ weight
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, y[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    cat = lambda k: torch.cat([s[k] for s in seqs])  # noqa: E731
    return LossInputs(
        logprobs=logprobs,
        loss_mask=cat("mask"),
        seq_ids=torch.cat([torch.full((len(s["y"]),), i) for i, s in enumerate(seqs)]),
        is_demo=torch.tensor([s["demo"] for s in seqs]),
        advantages=torch.tensor([s["adv"] for s in seqs]),
        adv_advantages=torch.tensor([s["adv2"] for s in seqs]),
        old_logprobs=logprobs.detach() + cat("old"),
        ref_logprobs=logprobs.detach() + cat("ref"),
        engine_logprobs=logprobs.detach() + cat("engine"),
        entropy=entropy,
        seq_token_counts=torch.tensor([s["full"] for s in seqs]) if "full" in seqs[0] else None,
    )


def _cp_slice(seq: dict, rank: int, world: int) -> dict:
    """This context-parallel rank's contiguous share of a sequence's tokens; keeps the full length."""
    n = len(seq["y"])
    lo, hi = n * rank // world, n * (rank + 1) // world
    out = {k: (v[lo:hi] if isinstance(v, torch.Tensor) else v) for k, v in seq.items()}
    out["full"] = int(seq["mask"].sum())
    return out


def _config(mode: str) -> ObjectiveConfig:
    return ObjectiveConfig(
        algorithm="uniapl",
        w_sft=0.7,
        lambda_adv=0.3,
        loss_agg_mode=mode,
        agg_norm_length=16,
        clip_eps_high=0.28,
        dual_clip_c=1.5,
        kl_coef=0.05,
        entropy_coef=0.01,
        tis_cap=1.5,
    )


# Micro-batches of the split runs: uneven sizes, each mixing demos and rollouts differently, and a filler.
SPLITS = [[0, 3, 4], [1, 5], [2], [6, 7], []]


def _run(
    parts: list[list[int]],
    mode: str,
    group=None,
    seq_group=None,
    cp: tuple[int, int] | None = None,
    per_micro_counts: bool = False,
):
    torch.manual_seed(123)
    weight = torch.randn(D, V, requires_grad=True)
    seqs = _toy_step()
    if cp is not None:
        seqs = [_cp_slice(s, *cp) for s in seqs]
    batches = [_pack([seqs[i] for i in part], weight) for part in parts]
    cfg = _config(mode)
    w = resolve_weights(cfg, step=0)
    counts = step_counts(batches, group=group, seq_group=seq_group)
    total, metrics = 0.0, []
    for b in batches:
        loss, m = objective_loss(b, w, cfg, step_counts([b]) if per_micro_counts else counts)
        loss.backward()
        total = total + loss.detach()
        metrics.append(m)
    return total, weight.grad.clone(), sum_metrics(metrics, group)


MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("mode", MODES)
def test_one_vs_four_micro_batches_same_loss_and_gradient(mode):
    loss1, grad1, m1 = _run([list(range(8))], mode)
    loss4, grad4, m4 = _run(SPLITS, mode)
    assert abs(loss1.item()) > 1e-3 and grad1.abs().max() > 1e-3  # not a trivial zero
    torch.testing.assert_close(loss4, loss1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad4, grad1, atol=1e-6, rtol=1e-6)
    assert m1["pg/dual_clip_frac"] > 0 and m1["tis/capped_frac"] > 0 and m1["pg/clip_frac"] > 0
    assert m4.keys() == m1.keys()
    for k in m1:
        assert m4[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
    # The test can fail: normalising each micro-batch by its own counts changes the result.
    naive, _, _ = _run(SPLITS, mode, per_micro_counts=True)
    assert abs(naive.item() - loss1.item()) > 1e-3


def _dp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # Each rank alone is a "data-parallel group" when the two ranks are context-parallel peers.
    alone = [dist.new_group([r]) for r in range(world)][rank]
    try:
        for mode in MODES:
            for kind in ("dp", "cp"):
                if kind == "dp":  # rank 0: micro-batches 0, 2 and the filler; rank 1: 1 and 3
                    loss, grad, metrics = _run(SPLITS[rank::world], mode, group=dist.group.WORLD)
                else:  # every rank: all micro-batches, its half of every sequence's tokens
                    loss, grad, metrics = _run(SPLITS, mode, group=dist.group.WORLD, seq_group=alone, cp=(rank, world))
                dist.all_reduce(loss, op=dist.ReduceOp.SUM)  # the step's loss = sum over ranks
                dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # gradient reduction: sum, not mean
                if rank == 0:
                    out = {"loss": loss, "grad": grad, "metrics": metrics}
                    torch.save(out, os.path.join(out_dir, f"{kind}-{mode}.pt"))
        # Only rank 0 holds metrics (as the last pipeline stage does); rank 1 reduces the step's keys with it.
        cfg = _config("token-mean")
        held = [_run([list(range(8))], "token-mean")[2]] if rank == 0 else []
        summed = sum_metrics(held, dist.group.WORLD, keys=metric_names(resolve_weights(cfg, step=0), cfg))
        torch.save(summed, os.path.join(out_dir, f"held-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_dp_and_cp_one_vs_two_ranks_same_loss_and_gradient(tmp_path):
    """DP 2 (sequences split between ranks) and CP 2 (every sequence's tokens split) vs one rank."""
    mp.spawn(_dp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for mode in MODES:
        loss1, grad1, m1 = _run([list(range(8))], mode)
        for kind in ("dp", "cp"):
            got = torch.load(tmp_path / f"{kind}-{mode}.pt", weights_only=True)
            torch.testing.assert_close(got["loss"], loss1, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(got["grad"], grad1, atol=1e-6, rtol=1e-6)
            for k in m1:
                assert got["metrics"][k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), (kind, mode, k)
    m1 = _run([list(range(8))], "token-mean")[2]
    for rank in (0, 1):  # both ranks get the holder's metrics, every key of the step
        assert torch.load(tmp_path / f"held-rank{rank}.pt", weights_only=True) == pytest.approx(m1, rel=1e-12)


def test_sum_metrics_refuses_a_metric_outside_the_keys():
    with pytest.raises(ValueError, match=r"metrics \['kl'\] are not among keys"):
        sum_metrics([{"loss/total": 1.0, "kl": 0.5}], keys=["loss/total"])
