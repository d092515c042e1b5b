"""Qwen3 / Qwen3-MoE student on Megatron-core: HF config -> TransformerConfig -> GPTModel chunks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel

# megatron-core 0.16.1 reads moe_utils.te_general_gemm unguarded; it is only defined when TE imports.
from megatron.core.transformer.moe import moe_utils as _moe_utils
from megatron.core.transformer.transformer_config import TransformerConfig

from ..parallel import ParallelConfig
from .arch import ConfigError, Qwen3Arch
from .specs import FP8_ALIGN, block_spec, choose_spec, fused_kernels

if not hasattr(_moe_utils, "te_general_gemm"):
    _moe_utils.te_general_gemm = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP8_RECIPES = ("none", *FP8_ALIGN)


@dataclass
class ModelConfig:
    hf_path: str = ""
    """Hugging Face folder (config.json [+ safetensors]) of the student; weights come from `load` if set."""
    load: str | None = None
    """Megatron checkpoint to start from (from `tools/convert_hf.py import`); None = weights of hf_path."""
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Parameter/compute dtype. CPU runs use fp32."""
    spec: Literal["auto", "te", "torch"] = "auto"
    """Layer spec: te (Transformer Engine; fails at start-up, naming TE's import error, when TE does not import),
    torch (torch SDPA + RMSNorm, any device), or auto: TE when it imports and a GPU is visible, else torch, and
    the log says which and why (a warning when a GPU is there but TE is not)."""
    fp8: Literal["none", "delayed", "tensorwise", "blockwise", "mxfp8"] = "none"
    """FP8 recipe, run by Transformer Engine (spec te or auto; never falls back to bf16). delayed / tensorwise
    need compute capability 8.9+ (Ada, Hopper), blockwise 9.0+ (Hopper), mxfp8 10.0+ (Blackwell): refused at
    start-up otherwise. Each packed row is then padded so each rank's token count is a multiple of 16 (32 for
    mxfp8, 128 for blockwise), see data.packing.row_pad_multiple."""
    fp8_param: bool = False
    """Keep the weights themselves in FP8 (TransformerConfig.fp8_param) and all-gather them in FP8 in the
    distributed optimizer (DDP fp8_param_gather): less weight memory and half the gather traffic. Needs an FP8
    recipe and, for training, parallel.use_distributed_optimizer (it re-quantises the fp32 master shards). Weight
    sync and checkpoint export dequantise each rank's shard before gathering, so HF tensors stay bf16/fp32."""
    fp8_bf16_first_last_layers: bool = False
    """Run the first and the last transformer layer in bf16 under FP8 (Megatron-LM's --first-last-layers-bf16):
    they are the most sensitive to FP8 rounding. Not with the delayed recipe (Megatron refuses it)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: selective (core attention) or full (whole layers, uniform method)."""
    recompute_num_layers: int = 1
    """Layers per recomputed chunk for full recompute."""
    moe_aux_loss_coeff: float = 0.0
    """MoE load-balancing loss weight; RL fine-tuning usually keeps the pretrained routing (0)."""
    moe_router_dtype: Literal["fp32", "fp64"] = "fp32"
    """Router softmax/top-k precision: fp32 keeps routing identical between trainer and rollout."""
    make_vocab_size_divisible_by: int = 128
    """Embedding rows are padded to a multiple of this times TP; padding is dropped on export."""

    def use_te(self) -> bool:
        """Build the Transformer Engine spec? Refuses FP8 / spec te configurations that cannot run (see specs)."""
        self.check_fp8_options()
        return choose_spec(self.spec, self.fp8)

    def check_fp8_options(self) -> None:
        """The FP8 fields among themselves (the hardware and TE are checked by use_te)."""
        if self.fp8 not in FP8_RECIPES:
            raise ConfigError(f"model.fp8={self.fp8!r}: expected one of {', '.join(FP8_RECIPES)}")
        if self.fp8 == "none":
            for name in ("fp8_param", "fp8_bf16_first_last_layers"):
                if getattr(self, name):
                    raise ConfigError(f"model.{name}=true needs an FP8 recipe (model.fp8 is none)")
        if self.fp8_bf16_first_last_layers and self.fp8 == "delayed":
            raise ConfigError(
                "model.fp8_bf16_first_last_layers=true does not work with model.fp8=delayed (its amax "
                "history would be reduced wrongly across the bf16 layers); use tensorwise, blockwise "
                "or mxfp8"
            )


def check_fp8_training(model: ModelConfig, parallel: ParallelConfig) -> None:
    """FP8 weights are updated by re-quantising the distributed optimizer's fp32 master shards; Megatron's other
    optimizer would leave them at their first values (Megatron-LM refuses the same)."""
    if model.fp8_param and not parallel.use_distributed_optimizer:
        raise ConfigError(
            "model.fp8_param=true needs parallel.use_distributed_optimizer=true to train (the FP8 "
            "weights are rebuilt from its fp32 master shards)"
        )


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def transformer_config(
    arch: Qwen3Arch, parallel: ParallelConfig, model: ModelConfig, use_te: bool, num_query_groups: int | None = None
) -> TransformerConfig:
    """``num_query_groups`` overrides the KV-head count Megatron uses (a checkpoint imported with KV heads
    replicated for a large TP keeps that count)."""
    dtype = DTYPES[model.dtype]
    groups = num_query_groups or parallel.num_query_groups(arch)
    if groups % parallel.tensor_model_parallel_size:
        raise ConfigError(
            f"the checkpoint has {groups} KV groups (KV heads replicated at import), which TP="
            f"{parallel.tensor_model_parallel_size} does not divide; use a TP that divides {groups}"
        )
    if model.fp8 != "none" and not use_te:
        raise ConfigError(f"model.fp8={model.fp8} needs the Transformer Engine spec (GPU with TE installed)")
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        autocast_dtype=dtype,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        # TE / apex kernels where they exist, off elsewhere: decided in specs.fused_kernels.
        **fused_kernels(use_te),
        use_cpu_initialization=not torch.cuda.is_available(),
        batch_p2p_sync=torch.cuda.is_available(),
        **_moe_settings(arch, model, use_te),
        **_recompute_settings(model),
        **_fp8_settings(model),
    )


def _moe_settings(arch: Qwen3Arch, model: ModelConfig, use_te: bool) -> dict[str, Any]:
    """TransformerConfig's MoE fields for a Qwen3-MoE model (none for a dense one)."""
    if not arch.is_moe:
        return {}
    return dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_intermediate_size,
        moe_router_topk=arch.num_experts_per_tok,
        # Qwen3-MoE: softmax over all experts, top-k, renormalise when norm_topk_prob. Softmax over the
        # top-k logits equals that renormalised choice, so norm_topk_prob maps to "no pre-softmax".
        moe_router_pre_softmax=not arch.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype=model.moe_router_dtype,
        moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=use_te,
        moe_layer_freq=[1 if i in arch.moe_layers else 0 for i in range(arch.num_layers)],
        # No token dropping: every token reaches its experts, as in the HF model.
        moe_expert_capacity_factor=None,
    )


def _recompute_settings(model: ModelConfig) -> dict[str, Any]:
    """TransformerConfig's activation-recompute fields for model.recompute."""
    if model.recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if model.recompute == "full":
        return dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=model.recompute_num_layers
        )
    return {}


def _fp8_settings(model: ModelConfig) -> dict[str, Any]:
    """TransformerConfig's FP8 fields for model.fp8 (first and last layers stay bf16 when asked)."""
    if model.fp8 == "none":
        return {}
    return dict(
        fp8="e4m3" if model.fp8 in ("blockwise", "mxfp8") else "hybrid",
        fp8_recipe=model.fp8,
        fp8_param=model.fp8_param,
        first_last_layers_bf16=model.fp8_bf16_first_last_layers,
        num_layers_at_start_in_bf16=1,
        num_layers_at_end_in_bf16=1,
    )


def build_model(
    arch: Qwen3Arch,
    parallel: ParallelConfig,
    model: ModelConfig,
    initialize: bool = True,
    num_query_groups: int | None = None,
) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), on the current device.

    ``initialize=False`` skips random init (weights are about to be loaded): much faster on CPU.
    """
    from megatron.core import parallel_state

    use_te = model.use_te()
    cfg = transformer_config(arch, parallel, model, use_te, num_query_groups)
    cfg.perform_initialization = initialize
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    vocab = padded_vocab_size(arch.vocab_size, model.make_vocab_size_divisible_by, parallel.tensor_model_parallel_size)
    chunks = []
    for vp in range(vpp):
        vp_stage = vp if vpp > 1 else None
        first = pp_rank == 0 and vp == 0
        last = pp_rank == pp_size - 1 and vp == vpp - 1
        chunk = GPTModel(
            config=cfg,
            transformer_layer_spec=block_spec(cfg, arch.moe_layers, use_te, vp_stage=vp_stage, pp_rank=pp_rank),
            vocab_size=vocab,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=first,
            post_process=last,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            rotary_percent=1.0,
            vp_stage=vp_stage,
        )
        mark_tensor_parallel_params(chunk)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks


def mark_tensor_parallel_params(chunk: torch.nn.Module) -> None:
    """Tag the weights of Megatron's own TP-split layers ``tensor_model_parallel``.

    Megatron's ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding set that tag only while
    initialising their weights, and we build without initialising (the weights are loaded next). The
    optimizer's grad norm counts an untagged parameter on TP rank 0 only, as a duplicate, so without the
    tag the norm (and clipping) missed the other TP ranks' shards. Transformer Engine's layers tag their
    own weights; a tag already present is kept.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in chunk.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        for name in ("weight", "bias") if dim == 0 else ("weight",):
            param = getattr(module, name, None)
            if isinstance(param, torch.nn.Parameter) and not hasattr(param, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(param, True, dim, 1)
