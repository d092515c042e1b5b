"""The single source of truth for Qwen3 names: Megatron parameter <-> Hugging Face tensor(s).

A declarative table (one row per weight) plus the few transforms a row can name. Checkpoint import and
export, and rollout weight sync, all resolve names here. Names use the *global* layer index {L} and the
*global* expert index {E}; both layer specs' names are listed (TE fuses the pre-attention/pre-MLP norms into
the following linear; the torch-native spec keeps them as separate modules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..models.arch import Qwen3Arch

REPLICATED, COLUMN, ROW, VOCAB, QKV, GATE_UP = "replicated", "column", "row", "vocab", "qkv", "gate_up"


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    kind: str


_A = "model.layers.{L}.self_attn."
_M = "model.layers.{L}.mlp."
_E = "model.layers.{L}.mlp.experts.{E}."

QWEN3_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED),
    # attention
    Rule("decoder.layers.{L}.input_layernorm.weight", ("model.layers.{L}.input_layernorm.weight",), REPLICATED),
    Rule(
        "decoder.layers.{L}.self_attention.linear_qkv.layer_norm_weight",
        ("model.layers.{L}.input_layernorm.weight",),
        REPLICATED,
    ),
    Rule(
        "decoder.layers.{L}.self_attention.linear_qkv.weight",
        (_A + "q_proj.weight", _A + "k_proj.weight", _A + "v_proj.weight"),
        QKV,
    ),
    Rule("decoder.layers.{L}.self_attention.q_layernorm.weight", (_A + "q_norm.weight",), REPLICATED),
    Rule("decoder.layers.{L}.self_attention.k_layernorm.weight", (_A + "k_norm.weight",), REPLICATED),
    Rule("decoder.layers.{L}.self_attention.linear_proj.weight", (_A + "o_proj.weight",), ROW),
    # dense MLP
    Rule(
        "decoder.layers.{L}.pre_mlp_layernorm.weight", ("model.layers.{L}.post_attention_layernorm.weight",), REPLICATED
    ),
    Rule(
        "decoder.layers.{L}.mlp.linear_fc1.layer_norm_weight",
        ("model.layers.{L}.post_attention_layernorm.weight",),
        REPLICATED,
    ),
    Rule("decoder.layers.{L}.mlp.linear_fc1.weight", (_M + "gate_proj.weight", _M + "up_proj.weight"), GATE_UP),
    Rule("decoder.layers.{L}.mlp.linear_fc2.weight", (_M + "down_proj.weight",), ROW),
    # MoE: router, then experts as the torch-native spec (SequentialMLP) and TE (grouped GEMM) name them
    Rule("decoder.layers.{L}.mlp.router.weight", (_M + "gate.weight",), REPLICATED),
    Rule(
        "decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.weight",
        (_E + "gate_proj.weight", _E + "up_proj.weight"),
        GATE_UP,
    ),
    Rule("decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight", (_E + "down_proj.weight",), ROW),
    Rule(
        "decoder.layers.{L}.mlp.experts.linear_fc1.weight{E}", (_E + "gate_proj.weight", _E + "up_proj.weight"), GATE_UP
    ),
    Rule("decoder.layers.{L}.mlp.experts.linear_fc2.weight{E}", (_E + "down_proj.weight",), ROW),
)


def _compile(pattern: str) -> re.Pattern[str]:
    rx = re.escape(pattern).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
    return re.compile(rx + "$")


_COMPILED = [(_compile(r.megatron), r) for r in QWEN3_RULES]


@dataclass(frozen=True)
class Resolved:
    rule: Rule
    hf_names: tuple[str, ...]
    is_expert: bool


def resolve(global_megatron_name: str, arch: Qwen3Arch) -> Resolved:
    """HF name(s) and transform of one Megatron parameter (global layer/expert indices)."""
    for rx, rule in _COMPILED:
        m = rx.match(global_megatron_name)
        if m:
            fields = m.groupdict()
            names = tuple(h.format(**fields) for h in rule.hf)
            if rule.megatron == "output_layer.weight" and arch.tie_word_embeddings:
                # Last pipeline stage's copy of the tied embedding.
                names = ("model.embed_tokens.weight",)
            return Resolved(rule, names, "E" in fields)
    raise KeyError(f"no mapping rule for Megatron parameter {global_megatron_name!r}")


def expected_hf_shapes(arch: Qwen3Arch) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of this architecture holds, with its shape (the config's promise)."""
    h, d = arch.hidden_size, arch.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = (arch.vocab_size, h)
    for L in range(arch.num_layers):
        a, m = f"model.layers.{L}.self_attn.", f"model.layers.{L}.mlp."
        out.update(
            {
                f"model.layers.{L}.input_layernorm.weight": (h,),
                f"model.layers.{L}.post_attention_layernorm.weight": (h,),
                a + "q_proj.weight": (arch.num_heads * d, h),
                a + "k_proj.weight": (arch.num_kv_heads * d, h),
                a + "v_proj.weight": (arch.num_kv_heads * d, h),
                a + "o_proj.weight": (h, arch.num_heads * d),
                a + "q_norm.weight": (d,),
                a + "k_norm.weight": (d,),
            }
        )
        if L in arch.moe_layers:
            out[m + "gate.weight"] = (arch.num_experts, h)
            f = arch.moe_intermediate_size
            for E in range(arch.num_experts):
                e = f"{m}experts.{E}."
                out.update(
                    {e + "gate_proj.weight": (f, h), e + "up_proj.weight": (f, h), e + "down_proj.weight": (h, f)}
                )
        else:
            f = arch.intermediate_size
            out.update({m + "gate_proj.weight": (f, h), m + "up_proj.weight": (f, h), m + "down_proj.weight": (h, f)})
    return out


# ---- transforms: full HF tensors <-> this rank's shard ------------------------------------------------


def to_shard(
    kind: str,
    hf: list[torch.Tensor],
    tp_rank: int,
    tp_size: int,
    arch: Qwen3Arch,
    num_query_groups: int,
    padded_vocab: int,
) -> torch.Tensor:
    """This TP rank's slice of the Megatron parameter built from full HF tensors."""
    if kind == REPLICATED:
        return hf[0]
    if kind == VOCAB:
        full = hf[0]
        if padded_vocab > full.shape[0]:
            pad = full.new_zeros(padded_vocab - full.shape[0], full.shape[1])
            full = torch.cat([full, pad])
        return full.chunk(tp_size, 0)[tp_rank]
    if kind == COLUMN:
        return hf[0].chunk(tp_size, 0)[tp_rank]
    if kind == ROW:
        return hf[0].chunk(tp_size, 1)[tp_rank]
    if kind == GATE_UP:
        gate, up = hf
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]])
    if kind == QKV:
        return fuse_qkv(*hf, arch, num_query_groups).chunk(tp_size, 0)[tp_rank]
    raise ValueError(kind)


def from_shards(kind: str, shards: list[torch.Tensor], arch: Qwen3Arch, num_query_groups: int) -> list[torch.Tensor]:
    """Full HF tensor(s) from all TP ranks' slices (in rank order)."""
    if kind == REPLICATED:
        return [shards[0]]
    if kind == VOCAB:
        return [torch.cat(shards)[: arch.vocab_size]]
    if kind == COLUMN:
        return [torch.cat(shards)]
    if kind == ROW:
        return [torch.cat(shards, 1)]
    if kind == GATE_UP:
        halves = [s.chunk(2, 0) for s in shards]
        return [torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])]
    if kind == QKV:
        return list(split_qkv(torch.cat(shards), arch, num_query_groups))
    raise ValueError(kind)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Qwen3Arch, groups: int) -> torch.Tensor:
    """Megatron's fused layout: per KV group, its query heads then its K head then its V head.

    With more groups than KV heads (TP > KV heads) each KV head is replicated to consecutive groups, so
    query head i still sees KV head i // (heads / kv_heads), as in the HF model.
    """
    d, h = arch.head_dim, q.shape[1]
    rep = groups // arch.num_kv_heads
    k = k.view(arch.num_kv_heads, 1, d, h).repeat_interleave(rep, 0)
    v = v.view(arch.num_kv_heads, 1, d, h).repeat_interleave(rep, 0)
    q = q.view(groups, arch.num_heads // groups, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def split_qkv(fused: torch.Tensor, arch: Qwen3Arch, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, h = arch.head_dim, fused.shape[1]
    per = arch.num_heads // groups
    x = fused.view(groups, per + 2, d, h)
    q = x[:, :per].reshape(-1, h)
    k, v = x[:, per], x[:, per + 1]
    rep = groups // arch.num_kv_heads
    if rep > 1:
        # Replicas start identical and may drift in training; their mean (in fp64, exact when equal) is the
        # best single head to hand back.
        k = k.view(arch.num_kv_heads, rep, d, h).double().mean(1).to(fused.dtype)
        v = v.view(arch.num_kv_heads, rep, d, h).double().mean(1).to(fused.dtype)
    return q, k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()
