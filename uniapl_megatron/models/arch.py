"""The architecture facts of a Qwen3 / Qwen3-MoE checkpoint, read from its Hugging Face config.json.

One small dataclass that everything else (model builder, converter, memory planner, rollout) reads,
so that the HF config is parsed and validated in exactly one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")


class ConfigError(ValueError):
    """A configuration that cannot work; the message says which values disagree."""


@dataclass(frozen=True)
class Qwen3Arch:
    model_type: str  # "qwen3" or "qwen3_moe"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # Qwen3-0.6B: 128 != hidden / heads
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    initializer_range: float = 0.02
    # MoE (zero experts = dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    moe_layers: tuple[int, ...] = ()  # indices of MoE layers (0-based)
    torch_dtype: str = "bfloat16"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "Qwen3Arch":
        """Read a config.json dict; anything missing, mistyped or not Qwen3 names `source` and the field."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        hidden, heads = _need(cfg, source, "hidden_size"), _need(cfg, source, "num_attention_heads")
        head_dim = cfg.get("head_dim") or hidden // heads
        rope_theta = _rope_theta(cfg, source)
        n_layers = _need(cfg, source, "num_hidden_layers")
        moe = _moe_fields(cfg, source, n_layers) if model_type == "qwen3_moe" else {}
        arch = cls(
            model_type=model_type,
            vocab_size=_need(cfg, source, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_need(cfg, source, "intermediate_size"),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            initializer_range=float(cfg.get("initializer_range", 0.02)),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            **moe,
        )
        if arch.num_heads % arch.num_kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={arch.num_heads} is not a multiple of "
                f"num_key_value_heads={arch.num_kv_heads}"
            )
        if arch.is_moe and not 0 < arch.num_experts_per_tok <= arch.num_experts:
            raise ConfigError(
                f"{source}: num_experts_per_tok={arch.num_experts_per_tok} must be in 1..num_experts={arch.num_experts}"
            )
        return arch

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Qwen3Arch":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{folder}: no config.json (expected a Hugging Face model folder)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_hf_dict(cfg, source=str(path))

    def num_params(self) -> int:
        """Parameters of the HF model (embeddings counted once when tied)."""
        h, L = self.hidden_size, self.num_layers
        attn = h * self.head_dim * (self.num_heads * 2 + self.num_kv_heads * 2) + 2 * self.head_dim
        dense_mlp = 3 * h * self.intermediate_size
        moe_mlp = self.num_experts * 3 * h * self.moe_intermediate_size + self.num_experts * h
        per_layer = attn + 2 * h
        total = sum(per_layer + (moe_mlp if i in self.moe_layers else dense_mlp) for i in range(L))
        emb = self.vocab_size * h
        return total + h + emb * (1 if self.tie_word_embeddings else 2)


def _need(cfg: dict[str, Any], source: str, key: str, typ: type | tuple[type, ...] = int) -> Any:
    """cfg[key], which must be present and of type `typ` (a bool is not an int here)."""
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{source}: missing field {key!r}")
    if not isinstance(cfg[key], typ) or isinstance(cfg[key], bool) and typ is int:
        raise ConfigError(f"{source}: field {key!r} should be {typ}, got {cfg[key]!r}")
    return cfg[key]


def _rope_theta(cfg: dict[str, Any], source: str) -> float:
    """The RoPE base; refuses what the Megatron model does not build (scaled RoPE, biases, sliding windows)."""
    # transformers >= 5 writes rope settings under rope_parameters; released Qwen3 configs use rope_theta.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only default RoPE)")
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    if cfg.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not Qwen3 (Qwen3 has no biases)")
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{source}: sliding-window attention is not supported")
    return float(rope_theta)


def _moe_fields(cfg: dict[str, Any], source: str, n_layers: int) -> dict[str, Any]:
    """Qwen3Arch's MoE fields from a qwen3_moe config (layers with experts by Qwen3-MoE's rule)."""
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense_only = set(cfg.get("mlp_only_layers") or [])
    if "num_experts" not in cfg and "num_local_experts" in cfg:  # transformers >= 5 spelling
        cfg = {**cfg, "num_experts": cfg["num_local_experts"]}
    return dict(
        num_experts=_need(cfg, source, "num_experts"),
        num_experts_per_tok=_need(cfg, source, "num_experts_per_tok"),
        moe_intermediate_size=_need(cfg, source, "moe_intermediate_size"),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0),
        moe_layers=tuple(i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0),
    )
