"""Megatron side of the mapping: this rank's parameters under global names, loaded from or gathered into
full Hugging Face tensors, at any TP / PP / VPP / EP layout.

Used by checkpoint import/export and by rollout weight sync (one code path for both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from ..models.arch import Qwen3Arch
from .mapping import Resolved, expected_hf_shapes, from_shards, resolve, to_shard

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"(mlp\.experts\.local_experts\.)(\d+)(\.)")
_GROUPED_EXPERT = re.compile(r"(mlp\.experts\.linear_fc[12]\.weight)(\d+)$")


class ConversionError(ValueError):
    """A checkpoint that does not fit the model; the message names the tensor and what was expected."""


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


@dataclass
class LocalParam:
    megatron_name: str  # global name
    param: torch.nn.Parameter
    resolved: Resolved
    local_expert: int | None  # index on this EP rank (experts only)


def _groups(is_expert: bool) -> tuple[int, int, object]:
    from megatron.core import parallel_state as ps

    if is_expert:
        return (
            ps.get_expert_tensor_parallel_rank(),
            ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_group(),
        )
    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_group(),
    )


def _ep() -> tuple[int, int, object]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_expert_model_parallel_rank(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_model_parallel_group(),
    )


def local_params(chunks: list[torch.nn.Module], arch: Qwen3Arch) -> list[LocalParam]:
    """This rank's parameters, in a fixed order, named with global layer and expert indices."""
    ep_rank, ep_size, _ = _ep()
    n_local_experts = arch.num_experts // ep_size if arch.is_moe else 0
    out = []
    for chunk in chunks:
        model = unwrap(chunk)
        for name, p in model.named_parameters():
            m = _LAYER.match(name)
            if m:
                layer = model.decoder.layers[int(m.group(1))]
                name = f"decoder.layers.{layer.layer_number - 1}." + name[m.end() :]
            local_e = None
            for rx in (_LOCAL_EXPERT, _GROUPED_EXPERT):
                em = rx.search(name)
                if em:
                    local_e = int(em.group(2))
                    glob = ep_rank * n_local_experts + local_e
                    tail = em.group(3) if rx is _LOCAL_EXPERT else ""
                    name = name[: em.start()] + em.group(1) + str(glob) + tail + name[em.end() :]
            out.append(LocalParam(name, p, resolve(name, arch), local_e))
    return out


def _skip_on_export(lp: LocalParam, arch: Qwen3Arch) -> bool:
    # With tied embeddings the last stage's output layer is a copy of the first stage's embedding.
    return arch.tie_word_embeddings and lp.megatron_name == "output_layer.weight"


# ---- import: full HF tensors -> this rank's shards --------------------------------------------------------


def load_from_hf(
    chunks: list[torch.nn.Module],
    arch: Qwen3Arch,
    get_tensor: Callable[[str], torch.Tensor],
    num_query_groups: int,
    padded_vocab: int,
    on_param: Callable[[int], None] | None = None,
    keep: dict[torch.nn.Parameter, torch.Tensor] | None = None,
) -> None:
    """Fill this rank's parameters. ``get_tensor(hf_name)`` returns the full tensor (may be mmap-backed).

    ``keep`` collects each parameter's shard as read, before it is stored: FP8 weights (model.fp8_param) keep
    only a rounded copy, and the optimizer's fp32 master weights should start from these instead
    (:func:`high_precision_state_dict`)."""
    shapes = expected_hf_shapes(arch)
    for lp in local_params(chunks, arch):
        tensors = []
        for hf_name in lp.resolved.hf_names:
            t = get_tensor(hf_name)
            if tuple(t.shape) != shapes[hf_name]:
                raise ConversionError(
                    f"tensor {hf_name!r} has shape {tuple(t.shape)} but config.json implies {shapes[hf_name]}"
                )
            tensors.append(t)
        rank, size, _ = _groups(lp.resolved.is_expert)
        shard = to_shard(lp.resolved.rule.kind, tensors, rank, size, arch, num_query_groups, padded_vocab)
        if shard.shape != lp.param.shape:
            raise ConversionError(
                f"{lp.megatron_name}: built shard of shape {tuple(shard.shape)} from {lp.resolved.hf_names}, "
                f"but the Megatron parameter has shape {tuple(lp.param.shape)}"
            )
        with torch.no_grad():
            lp.param.copy_(shard)
        if keep is not None:
            keep[lp.param] = shard.contiguous()  # Megatron reads it flat
        if on_param:
            on_param(lp.param.numel() * lp.param.element_size())


def high_precision_state_dict(
    chunks: list[torch.nn.Module], kept: dict[torch.nn.Parameter, torch.Tensor]
) -> dict[str, Any]:
    """What Megatron's ``optimizer.reload_model_params(state_dict)`` takes to set the fp32 master weights from
    the shards :func:`load_from_hf` kept rather than from the (FP8) parameters: per chunk, by parameter name."""
    per_chunk = [{name: kept[p] for name, p in unwrap(c).named_parameters() if p in kept} for c in chunks]
    return per_chunk[0] if len(per_chunk) == 1 else {f"model{i}": sd for i, sd in enumerate(per_chunk)}


# ---- export / sync: this rank's shards -> full HF tensors -------------------------------------------------


def _all_gather(t: torch.Tensor, size: int, group: object) -> list[torch.Tensor]:
    if size == 1:
        return [t]
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t, group=group)
    return out


# Set by the trainer on a model chunk whose parameters the distributed optimizer may still owe an all-gather
# (DDP overlap_param_gather gathers lazily, in the next forward's pre-hooks); reading the weights in any other way
# must call it first. Collective over the data-parallel group.
PENDING_GATHER_ATTR = "uniapl_finish_param_gather"


def finish_param_gather(chunks: list[torch.nn.Module]) -> None:
    """Complete any lazy parameter all-gather of these chunks, so every rank holds the updated full weights."""
    for chunk in chunks:
        finish = getattr(chunk, PENDING_GATHER_ATTR, None)
        if finish is not None:
            finish()


def export_view(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a weight as plain numbers. Transformer Engine's FP8 weights (model.fp8_param) hold
    FP8 bytes plus this rank's own scales: they are dequantised here, before any gather mixes ranks."""
    from megatron.core.fp8_utils import is_float8tensor

    if is_float8tensor(param):
        return param.dequantize().to(param.dtype)  # TE's nominal dtype (bf16): what the plan announces
    return param.detach()


def _stage_items(chunks: list[torch.nn.Module], arch: Qwen3Arch) -> list[tuple[LocalParam, int]]:
    """(param, EP rank whose experts it names) in yield order; non-expert params once with rank -1."""
    _, ep_size, _ = _ep()
    items = []
    for lp in local_params(chunks, arch):
        if _skip_on_export(lp, arch):
            continue
        if lp.resolved.is_expert:
            items.extend((lp, r) for r in range(ep_size))
        else:
            items.append((lp, -1))
    return items


def _names_for(lp: LocalParam, ep_r: int, arch: Qwen3Arch) -> tuple[str, ...]:
    if ep_r < 0:
        return lp.resolved.hf_names
    ep_rank, ep_size, _ = _ep()
    n_local = arch.num_experts // ep_size
    name = lp.megatron_name.replace(
        f"experts.local_experts.{ep_rank * n_local + lp.local_expert}.",
        f"experts.local_experts.{ep_r * n_local + lp.local_expert}.",
    )
    name = re.sub(r"(linear_fc[12]\.weight)\d+$", rf"\g<1>{ep_r * n_local + lp.local_expert}", name)
    return resolve(name, arch).hf_names


def plan_stage(chunks: list[torch.nn.Module], arch: Qwen3Arch) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(HF name, shape, dtype) of what :func:`iter_stage` yields on this rank, in the same order, without
    communicating: a writer can lay out a file (or a receiver its buffers) before any data moves."""
    shapes = expected_hf_shapes(arch)
    plan = []
    for lp, ep_r in _stage_items(chunks, arch):
        for n in _names_for(lp, ep_r, arch):
            plan.append((n, shapes[n], lp.param.dtype))
    return plan


def iter_stage(
    chunks: list[torch.nn.Module],
    arch: Qwen3Arch,
    num_query_groups: int,
    only: Callable[[torch.nn.Parameter], bool] | None = None,
    track: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF tensors of this pipeline stage, gathered over TP and EP. Collective: every rank of the
    stage must iterate it to the end. Peak extra memory: one weight's gathered copies. ``only`` keeps the
    parameters it accepts (the same ones on every rank of the stage); ``track`` is shown every tensor this
    allocates (to measure what a sync holds, weight_sync.HeldBytes)."""
    _, ep_size, ep_group = _ep()
    seen = track or (lambda t: None)
    gathered_by_ep: list[tuple[torch.Tensor, ...]] | None = None
    finish_param_gather(chunks)
    for lp, ep_r in _stage_items(chunks, arch):
        if only is not None and not only(lp.param):
            continue
        if ep_r <= 0:
            _, size, group = _groups(lp.resolved.is_expert)
            with torch.no_grad():
                shards = _all_gather(export_view(lp.param), size, group)
                for t in shards:
                    seen(t)
                full = from_shards(lp.resolved.rule.kind, shards, arch, num_query_groups)
                del shards
            for t in full:
                seen(t)
            if lp.resolved.is_expert:
                # One all-gather over EP per tensor gives every EP rank's copy of "the same" local expert.
                gathered_by_ep = list(zip(*[_all_gather(t, ep_size, ep_group) for t in full]))
                for t in (x for g in gathered_by_ep for x in g):
                    seen(t)
        if ep_r < 0:
            yield from zip(lp.resolved.hf_names, full)
        else:
            assert gathered_by_ep is not None
            yield from zip(_names_for(lp, ep_r, arch), gathered_by_ep[ep_r])


def iter_hf_tensors(
    chunks: list[torch.nn.Module],
    arch: Qwen3Arch,
    num_query_groups: int,
    bucket_bytes: int = 0,
    track: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every full HF tensor of the model, on every rank (stages broadcast theirs over the PP group).

    This is what rollout weight sync consumes. Collective over the whole model-parallel world. With
    ``bucket_bytes`` > 0 a stage broadcasts its tensors in flat buckets of about that size (one collective per
    bucket; a larger tensor goes alone); a rank then holds at most one bucket plus one tensor's TP-gathered copies
    (and what its consumer keeps of the tensors yielded, which are copies, never views of the bucket). 0: one
    broadcast per tensor. ``track``: as for iter_stage.
    """
    from megatron.core import parallel_state as ps

    pp_size = ps.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        yield from iter_stage(chunks, arch, num_query_groups, track=track)
        return
    pp_rank, pp_group = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_group()
    plans: list[list] = [None] * pp_size  # type: ignore[list-item]
    dist.all_gather_object(plans, plan_stage(chunks, arch), group=pp_group)
    ranks = dist.get_process_group_ranks(pp_group)
    for stage in range(pp_size):
        mine = iter_stage(chunks, arch, num_query_groups, track=track) if stage == pp_rank else None
        for bucket in _plan_buckets(plans[stage], bucket_bytes):
            yield from _broadcast_bucket(bucket, mine, ranks[stage], pp_group, track or (lambda t: None))
        if mine is not None:
            for extra in mine:  # plan and iteration disagree: a bug, not a user error
                raise RuntimeError(f"iter_stage yielded {extra[0]!r} beyond its plan")


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_ALIGN = 64  # byte offset alignment inside a bucket: a view of any dtype stays aligned


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def _plan_buckets(plan: list, bucket_bytes: int) -> Iterator[list]:
    """Consecutive plan entries in buckets of at most bucket_bytes (aligned), made of whole layers (a non-layer
    tensor is a unit of its own): a loader that keeps a layer's tensors until the layer is complete (vLLM
    does) then holds views into one bucket only. A unit larger than the bucket goes alone; 0: one tensor each."""

    def layer(name: str) -> str | None:
        m = _HF_LAYER.match(name)
        return m.group(1) if m else None

    units: list[list] = []
    for entry in plan:
        if units and bucket_bytes > 0 and layer(entry[0]) is not None and layer(entry[0]) == layer(units[-1][-1][0]):
            units[-1].append(entry)
        else:
            units.append([entry])
    bucket: list = []
    size = 0
    for unit in units:
        n = sum(-(-_nbytes(e[1], e[2]) // _ALIGN) * _ALIGN for e in unit)
        if bucket and (bucket_bytes <= 0 or size + n > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.extend(unit)
        size += n
    if bucket:
        yield bucket


def _broadcast_bucket(
    bucket: list, mine: Iterator | None, src: int, group: object, seen: Callable[[torch.Tensor], None]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Broadcast one bucket of a stage's tensors from `src` (whose rank iterates `mine`); yield them."""
    if len(bucket) == 1:
        name, shape, dtype = bucket[0]
        if mine is not None:
            got, t = next(mine)
            assert got == name, (got, name)
            t = t.contiguous()
        else:
            t = torch.empty(shape, dtype=dtype, device=_device())
        seen(t)
        dist.broadcast(t, src=src, group=group)
        yield name, t
        return
    offsets, total = [], 0
    for _, shape, dtype in bucket:
        offsets.append(total)
        total += -(-_nbytes(shape, dtype) // _ALIGN) * _ALIGN
    flat = torch.empty(total, dtype=torch.uint8, device=_device())
    seen(flat)
    if mine is not None:
        for (name, _, _), off in zip(bucket, offsets):
            got, t = next(mine)
            assert got == name, (got, name)
            flat[off : off + t.numel() * t.element_size()].copy_(t.contiguous().reshape(-1).view(torch.uint8))
            del t  # one TP-gathered copy at a time beside the bucket
    dist.broadcast(flat, src=src, group=group)
    for (name, shape, dtype), off in zip(bucket, offsets):
        # A copy, not a view: a loader that keeps a tensor a while (vLLM keeps some until a later layer's
        # arrive) would otherwise keep the whole bucket alive with it.
        t = flat[off : off + _nbytes(shape, dtype)].view(dtype).view(shape).clone()
        seen(t)
        yield name, t


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
