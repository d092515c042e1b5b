"""The two layer specs: Transformer Engine's (GPU, FP8) and a torch-native one (torch SDPA, torch RMSNorm).

The torch-native spec keeps Megatron's own linears (ColumnParallel/RowParallel, so TP/SP are real) and
replaces only what Megatron's local spec does poorly: its unfused attention materialises the full score
matrix (out of memory at micro-batch 8 x 2048 on an H100 for Qwen3-0.6B), cannot take packed sequences,
and its torch norm wrapper refuses sequence parallelism.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises various errors when its CUDA libraries do not match
        return False
    return True


class RMSNorm(torch.nn.Module):
    """Qwen3's RMSNorm (fp32 statistics, weight applied in the input dtype, as transformers does).

    Tagged ``sequence_parallel`` so Megatron all-reduces its gradient over TP when SP splits tokens.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # q/k norms act on heads, not on sequence-split activations; Megatron reduces them by name.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel and hidden_size == config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SDPAttention(MegatronModule):
    """Causal core attention via torch SDPA (flash / memory-efficient kernels), GQA without repeating K/V.

    Takes Megatron's [s, b, heads, dim] layout, or packed THD sequences with cu_seqlens (each packed
    sequence attends only to itself).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs the Transformer Engine spec")
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [b, heads, s, d]; k, v: [b, groups, s, d]
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=True,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: Any = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        if packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            bounds = cu.tolist()
            outs = []
            for s, e in zip(bounds[:-1], bounds[1:]):
                if e > s:
                    o = self._attend(*(t[s:e].transpose(0, 1).unsqueeze(0) for t in (query, key, value)))
                    outs.append(o[0].transpose(0, 1))
            out = torch.cat(outs, dim=0)
            return out.reshape(out.shape[0], -1)
        sq, b, heads, dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._attend(q, k, v)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)


def _torch_native_layer(num_experts: int | None) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = SDPAttention
    attn.q_layernorm = RMSNorm
    attn.k_layernorm = RMSNorm
    return spec


def block_spec(
    config: TransformerConfig,
    moe_layers: tuple[int, ...],
    use_te: bool,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """Layer specs for the layers of one pipeline stage (dense or MoE per layer) plus the final norm."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        dense = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
        moe = get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=True, qk_layernorm=True
        ) if config.num_moe_experts else None
        final_norm: Any = TENorm
    else:
        dense = _torch_native_layer(None)
        moe = _torch_native_layer(config.num_moe_experts) if config.num_moe_experts else None
        final_norm = RMSNorm
    layers = [moe if i in moe_layers else dense for i in range(config.num_layers)]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=layers[offset : offset + n], layer_norm=final_norm)
