"""Data-parallel communication overlap (Megatron DDP's overlap_grad_reduce and overlap_param_gather): when it
is on, and what the trainer's step needs so that it stays correct.

- overlap_grad_reduce: each gradient bucket is reduced (all-reduce, or reduce-scatter with the distributed
  optimizer) as soon as the *last* micro-batch's backward has filled it. Megatron's schedules must therefore
  know how to hold the reduce back during the other micro-batches (``config.no_sync_func``) and, with
  pipelining, when to launch it (``config.grad_sync_func``); ``finalize_model_grads`` then only waits.
- overlap_param_gather (distributed optimizer only): the optimizer step updates each rank's shard and does not
  all-gather; the next forward's pre-hooks gather bucket by bucket. Anything that reads the weights without a
  forward (weight sync to the rollout engine, HF export, checkpoint save) must first finish that gather:
  :func:`wire_overlap` gives each model chunk the hook that ``convert.params.finish_param_gather`` calls.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Literal

from ..convert.params import PENDING_GATHER_ATTR, unwrap
from ..models.arch import ConfigError

log = logging.getLogger(__name__)

OverlapMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class Overlap:
    grad_reduce: bool
    param_gather: bool
    reason: str


def decide_overlap(
    mode: str, dp_size: int, has_cuda: bool, distributed_optimizer: bool, replicated_kv: bool
) -> Overlap:
    """The overlap settings for a run (the one place they are decided); ``reason`` says why, for the log.

    ``dp_size`` counts the ranks gradients are reduced over (data x context parallel). ``replicated_kv``: TP
    larger than the KV heads, whose per-copy gradients are summed over TP after backward (student.py); that
    sum must not race a bucket reduce already in flight, so gradient overlap stays off then.
    """
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"optim.overlap_comm={mode!r}: expected auto, on or off")
    if mode == "off":
        return Overlap(False, False, "optim.overlap_comm=off")
    if dp_size < 2:
        return Overlap(False, False, f"data-parallel size {dp_size}: no gradient reduce or weight gather to overlap")
    if mode == "auto" and not has_cuda:
        return Overlap(False, False, "no GPU: gloo runs collectives on the compute threads, nothing to overlap")
    param = distributed_optimizer
    why = f"DP {dp_size}" + ("" if has_cuda else ", forced on without a GPU")
    if not param:
        why += "; weight gather overlap needs parallel.use_distributed_optimizer"
    if replicated_kv:
        why += "; gradient overlap off: TP replicates KV heads, whose gradients are summed after backward"
    return Overlap(not replicated_kv, param, why)


def _one_or_list(funcs: list) -> Any:
    # Megatron's schedules take a single callable for one model chunk, a list for interleaved chunks.
    return funcs[0] if len(funcs) == 1 else funcs


def _finish_gather(chunk: Any) -> None:
    """Megatron's forced gather (what Megatron-LM runs before a checkpoint). Its overlap path leaves TE's
    post-gather step for FP8 weights (transposed / column-wise copies) to the next forward's hook, which skips
    it once the gather is done: run it here, as the non-overlapped gather does."""
    from megatron.core.fp8_utils import is_float8tensor, post_all_gather_processing

    chunk.start_param_sync(force_sync=True)
    fp8 = [p for p in chunk.module.parameters() if is_float8tensor(p)]
    if fp8:
        post_all_gather_processing(fp8)


def wire_overlap(wrapped: list, config: Any, overlap: Overlap) -> None:
    """Give Megatron's schedules and the weight readers what the chosen overlap needs (see the module doc)."""
    if overlap.grad_reduce:
        config.no_sync_func = _one_or_list([c.no_sync for c in wrapped])
        # Megatron-LM's default (align_grad_reduce): with pipelining, every stage launches its reduce together.
        config.grad_sync_func = _one_or_list([c.start_grad_sync for c in wrapped])
    if overlap.param_gather:
        for c in wrapped:
            setattr(unwrap(c), PENDING_GATHER_ATTR, functools.partial(_finish_gather, c))
    log.info(
        "data-parallel overlap: gradient reduce %s, weight gather %s (%s)",
        "on" if overlap.grad_reduce else "off",
        "on" if overlap.param_gather else "off",
        overlap.reason,
    )
