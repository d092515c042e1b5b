"""Replicated K/V heads (TP above the model's KV heads), the optimizer's gradient norm, and an optimizer step
that a non-finite gradient norm skips.

With TP > KV heads every TP rank holds one KV group, so ``rep = TP / KV heads`` consecutive TP ranks hold
a copy of the same K/V head in their ``linear_qkv`` weight. Two things keep those copies one head:

- their gradients are summed over the ranks that share the head (each copy's gradient holds only its own
  query heads' share), so the copies take the same update (:func:`replica_groups` gives the groups);
- the grad norm that clipping uses counts the copies once: Megatron counts every TP-split parameter on
  every TP rank, so it would see the K/V rows ``rep`` times (:func:`count_kv_copies_once`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist


def replica_groups(tp_group: Any, num_kv_heads: int) -> Any:
    """This rank's group of the TP ranks that hold a copy of the same KV head. ``new_group`` is collective
    over the world, so every rank creates every TP group's subgroups, in the same order."""
    rep = len(dist.get_process_group_ranks(tp_group)) // num_kv_heads
    tp_groups: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(tp_groups, tuple(dist.get_process_group_ranks(tp_group)))
    mine = None
    for ranks in sorted(set(tp_groups)):
        for h in range(num_kv_heads):
            members = list(ranks[h * rep : (h + 1) * rep])
            group = dist.new_group(members)
            if dist.get_rank() in members:
                mine = group
    return mine


def _leaf_optimizers(optimizer: Any) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _main_param_pairs(opt: Any) -> list[tuple[torch.nn.Parameter, torch.Tensor, int]]:
    """(model param, a main param standing for it in the optimizer, offset of the main param's first element
    in the flattened model param) for every main-param form this Megatron-core optimizer keeps."""
    pairs: list[tuple[torch.nn.Parameter, torch.Tensor, int]] = []
    if hasattr(opt, "_get_model_param_range_map"):  # distributed optimizer: shards of the flattened params
        for model_groups, shard_lists in (
            ("model_float16_groups", ("shard_fp32_from_float16_groups", "shard_float16_groups")),
            ("model_fp32_groups", ("shard_fp32_groups",)),
        ):
            for gi, group in enumerate(getattr(opt, model_groups)):
                for j, mp in enumerate(group):
                    start = opt._get_model_param_range_map(mp)["param"].start
                    pairs += [
                        (mp, getattr(opt, s)[gi][j], start) for s in shard_lists if getattr(opt, s)[gi][j] is not None
                    ]
        return pairs
    fp16_pairs = zip(getattr(opt, "float16_groups", []), getattr(opt, "fp32_from_float16_groups", []))
    for model_group, main_group in fp16_pairs:  # Float16OptimizerWithFloat16Params: fp32 copies, same shapes
        pairs += [(mp, main, 0) for mp, main in zip(model_group, main_group)]
    pairs += [(p, p, 0) for p in opt.get_parameters()]  # fp32 optimizers step the model params themselves
    return pairs


def count_kv_copies_once(
    optimizer: Any, qkv_params: list[torch.nn.Parameter], kv_rows: tuple[int, int], is_copy: bool
) -> None:
    """Make the optimizer's grad norm skip this rank's K/V rows of ``linear_qkv`` when this rank's K/V head
    is a copy (``is_copy``: not the first rank of its replica group). ``kv_rows``: the [start, end) rows of
    the K and V heads in the local weight. Wraps each leaf optimizer's ``get_main_grads_for_grad_norm``, the
    one list every Megatron grad-norm path (clipping included) sums over."""
    if not is_copy or not qkv_params:
        return
    wanted = {id(p) for p in qkv_params}
    for opt in _leaf_optimizers(optimizer):
        drop: dict[int, tuple[int, int]] = {}  # id(main param) -> its elements to leave out
        for mp, main, start in _main_param_pairs(opt):
            if id(mp) not in wanted:
                continue
            width = mp.shape[1]
            lo, hi = kv_rows[0] * width - start, kv_rows[1] * width - start
            lo, hi = max(lo, 0), min(hi, main.numel())
            if lo < hi:
                drop[id(main)] = (lo, hi)
        if drop:
            opt.get_main_grads_for_grad_norm = _without(opt, opt.get_main_grads_for_grad_norm, drop)


def _without(opt: Any, inner: Callable[[], list], drop: dict[int, tuple[int, int]]) -> Callable[[], list]:
    def grads_for_norm() -> list[torch.Tensor]:
        by_grad = {}
        for p in opt.get_parameters():
            if id(p) in drop:
                for attr in ("grad", "decoupled_grad"):  # the precision-aware optimizer keeps the latter
                    g = getattr(p, attr, None)
                    if g is not None:
                        by_grad[id(g)] = drop[id(p)]
        out = []
        for g in inner():
            cut = by_grad.get(id(g))
            if cut is None:
                out.append(g)
            else:
                flat = g.reshape(-1)
                out += [flat[: cut[0]], flat[cut[1] :]]
        return out

    return grads_for_norm


@torch.no_grad()
def step_unless_nonfinite(optimizer: Any, clip_grad: float) -> tuple[bool, float]:
    """One Megatron-core optimizer step, skipped when the gradient norm is NaN/inf: (stepped, grad norm).

    Megatron checks gradients for inf/NaN only under a loss scaler (fp16, or an explicit ``loss_scale``);
    its FP32Optimizer never checks and bf16 without a scaler neither, so a NaN gradient with a finite loss
    would reach Adam and poison every weight. This runs ``ChainedOptimizer.step``'s own sequence from the
    optimizer's public pieces (prepare the main grads, one grad norm, clip by it, step) for every optimizer
    form, with the norm checked before clipping. The norm is the one clipping needs anyway (computed here
    also when ``clip_grad`` is 0, so the check and the logged norm always exist); it is all-reduced over the
    gradient-statistics group (the model-parallel ranks, plus the data-parallel ones under the distributed
    optimizer, whose replicas otherwise hold identical reduced gradients), so every rank takes the same
    decision. On a skip the caller drops the gradients; nothing of the optimizer's state has moved."""
    if optimizer.prepare_grads():  # a loss scaler's own inf/NaN check (fp16), already agreed over ranks
        return False, float("nan")
    norm = float(optimizer.get_grad_norm())
    if not math.isfinite(norm):
        return False, norm
    if clip_grad > 0.0:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        for opt in _leaf_optimizers(optimizer):
            params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(
                    params, clip_grad, norm, opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
                )
    return bool(optimizer.step_with_ready_grads()), norm
