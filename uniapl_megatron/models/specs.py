"""The two layer specs: Transformer Engine's (GPU, FP8) and a torch-native one (torch SDPA, torch RMSNorm).

The torch-native spec keeps Megatron's own linears (ColumnParallel/RowParallel, so TP/SP are real) and
replaces only what Megatron's local spec does poorly: its unfused attention materialises the full score
matrix (out of memory at micro-batch 8 x 2048 on an H100 for Qwen3-0.6B), cannot take packed sequences,
and its torch norm wrapper refuses sequence parallelism.
"""

from __future__ import annotations

import logging
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

from ..data.packing import FP8_TOKEN_MULTIPLE
from .arch import ConfigError

log = logging.getLogger(__name__)


def transformer_engine_status() -> tuple[bool, str]:
    """(imports, detail): Transformer Engine's version, or the import error (type and message) naming why not.

    Not cached: a broken install reports the same error each time, and tests can put a stand-in on the path.
    """
    try:
        import transformer_engine
        import transformer_engine.pytorch
    except Exception as e:  # noqa: BLE001 - a broken TE raises ImportError, OSError (CUDA libraries), RuntimeError...
        return False, f"{type(e).__name__}: {e}"
    return True, f"Transformer Engine {getattr(transformer_engine, '__version__', '?')}"


def transformer_engine_available() -> bool:
    """TE imports and a CUDA device is visible (what the TE spec needs)."""
    return torch.cuda.is_available() and transformer_engine_status()[0]


# The FP8 recipes and the per-rank token multiple their GEMMs need (packing pads to it).
FP8_ALIGN = {k: v for k, v in FP8_TOKEN_MULTIPLE.items() if k != "none"}
# Oldest compute capability each recipe runs on: FP8 tensor cores from Ada/Hopper; MXFP8's block scales are
# Blackwell hardware; TE's blockwise recipe needs Hopper's FP8 GEMMs with per-block scales.
FP8_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


def fp8_hardware_problem(recipe: str, capability: tuple[int, int]) -> str | None:
    """Why ``recipe`` cannot run on a GPU of ``capability`` (None if it can)."""
    need = FP8_MIN_CAPABILITY[recipe]
    if tuple(capability) >= need:
        return None
    have = f"{capability[0]}.{capability[1]}"
    if recipe == "mxfp8":
        return f"model.fp8=mxfp8 needs a Blackwell GPU (compute capability 10.0 or newer); this GPU is {have}" + (
            " (Hopper): use model.fp8=blockwise or tensorwise there" if tuple(capability) >= (9, 0) else ""
        )
    return f"model.fp8={recipe} needs compute capability {need[0]}.{need[1]} or newer; this GPU is {have}"


def _te_recipe_problem(recipe: str) -> str | None:
    """TE's own support check for the recipe on this device (it also knows the CUDA version), if TE has one."""
    try:
        from transformer_engine.pytorch import fp8 as te_fp8
    except Exception:  # noqa: BLE001 - reported by transformer_engine_status
        return None
    name = {"mxfp8": "check_mxfp8_support", "blockwise": "check_fp8_block_scaling_support"}.get(
        recipe, "check_fp8_support"
    )
    check = getattr(te_fp8, name, None)
    if check is None:
        return None
    ok, reason = check()
    return None if ok else f"Transformer Engine says model.fp8={recipe} cannot run here: {reason}"


def fp8_problems(recipe: str) -> list[str]:
    """Everything that stops an FP8 recipe on this machine: no GPU, too old a GPU, TE missing or broken."""
    problems = []
    try:
        capability = torch.cuda.get_device_capability()
    except Exception as e:  # noqa: BLE001 - no driver / no device
        problems.append(f"model.fp8={recipe} needs a CUDA GPU; none is usable ({type(e).__name__}: {e})")
        capability = None
    if capability is not None:
        hw = fp8_hardware_problem(recipe, capability)
        if hw:
            problems.append(hw)
    te_ok, detail = transformer_engine_status()
    if not te_ok:
        problems.append(f"model.fp8={recipe} runs through Transformer Engine, which does not import: {detail}")
    elif capability is not None and not problems:
        te = _te_recipe_problem(recipe)
        if te:
            problems.append(te)
    return problems


_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def choose_spec(spec: str, fp8: str = "none") -> bool:
    """Whether to build the Transformer Engine spec; logs the choice and the reason, refuses what cannot run.

    ``spec: te`` and every FP8 recipe need TE: they fail here, naming TE's import error, instead of
    falling back to the torch-native spec (which would silently drop FP8 and TE's fused kernels).
    """
    if spec not in ("auto", "te", "torch"):
        raise ConfigError(f"model.spec={spec!r}: expected auto, te or torch")
    if fp8 != "none" and fp8 not in FP8_ALIGN:
        raise ConfigError(f"model.fp8={fp8!r}: expected none or one of {', '.join(FP8_ALIGN)}")
    if spec == "torch":
        if fp8 != "none":
            raise ConfigError(
                f"model.fp8={fp8} runs through Transformer Engine; model.spec=torch has no FP8 "
                "(use model.spec te or auto)"
            )
        _log_once(logging.INFO, "model.spec=torch: torch-native layer spec (torch SDPA + RMSNorm), as configured")
        return False
    te_ok, detail = transformer_engine_status()
    has_cuda = torch.cuda.is_available()
    if fp8 != "none":
        problems = fp8_problems(fp8)
        if problems:
            raise ConfigError("cannot run this FP8 configuration:\n  - " + "\n  - ".join(problems))
    elif spec == "te" and not (te_ok and has_cuda):
        why = [] if te_ok else [f"Transformer Engine does not import: {detail}"]
        why += [] if has_cuda else ["no CUDA device is visible"]
        raise ConfigError("model.spec=te: " + "; ".join(why))
    if te_ok and has_cuda:
        _log_once(logging.INFO, f"model.spec={spec}: Transformer Engine layer spec ({detail}, CUDA device present)")
        return True
    if has_cuda:  # auto on a GPU without a working TE: say so loudly, it costs FP8 and the fused kernels
        _log_once(
            logging.WARNING,
            f"model.spec=auto: torch-native layer spec, because Transformer Engine does not "
            f"import ({detail}); TE's fused kernels are off",
        )
    else:
        _log_once(logging.INFO, "model.spec=auto: torch-native layer spec (no CUDA device)")
    return False


def _apex_wgrad_kernel() -> bool:
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401 - NVIDIA apex's CUDA extension
    except Exception:  # noqa: BLE001
        return False
    return True


def fused_kernels(use_te: bool) -> dict[str, bool]:
    """TransformerConfig's fusion flags, on exactly where their kernels exist (the one place they are decided).

    - ``bias_activation_fusion``, ``bias_dropout_fusion``, ``apply_rope_fusion``: TE's kernels, so with the TE
      spec (TE imports, CUDA).
    - ``gradient_accumulation_fusion``: weight gradients accumulated straight into the fp32 main grads; TE's
      linears do it themselves, but Megatron's own linears (the output layer, the torch-native spec) need
      apex's ``fused_weight_gradient_mlp_cuda`` and refuse to build without it: so CUDA + that apex extension.
    - ``masked_softmax_fusion``, ``persist_layer_norm``: unused by either spec (TE / SDPA do attention, the
      norms are TE's or ours).
    """
    return {
        "bias_activation_fusion": use_te,
        "bias_dropout_fusion": use_te,
        "apply_rope_fusion": use_te,
        "gradient_accumulation_fusion": torch.cuda.is_available() and _apex_wgrad_kernel(),
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
    }


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
            q, k, v, is_causal=True, scale=self.scale, dropout_p=self.dropout if self.training else 0.0, enable_gqa=True
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
        moe = (
            get_gpt_layer_with_transformer_engine_spec(
                num_experts=config.num_moe_experts, moe_grouped_gemm=True, qk_layernorm=True
            )
            if config.num_moe_experts
            else None
        )
        final_norm: Any = TENorm
    else:
        dense = _torch_native_layer(None)
        moe = _torch_native_layer(config.num_moe_experts) if config.num_moe_experts else None
        final_norm = RMSNorm
    layers = [moe if i in moe_layers else dense for i in range(config.num_layers)]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=layers[offset : offset + n], layer_norm=final_norm)
