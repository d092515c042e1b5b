"""The torch engine's model: a dense Qwen3 written for batched decoding over a static KV cache.

Why not transformers' forward: its generic cache and mask machinery costs host time every step and compiles
slowly (on the H100 its compiled step did not finish compiling in 120 s). Here one decode step is a fixed
graph of plain tensor ops: the KV cache is preallocated, written with `index_copy_` at a slot held in a device
tensor, and attention reads the whole cache under a boolean mask, so every step has the same shapes and the
step (forward + sampling) compiles with `fullgraph=True` and replays as one CUDA graph.

q/k/v and gate/up are fused into one GEMM each; `hf_tensors()` still names every weight as Hugging Face
does (`model.layers.0.self_attn.q_proj.weight` is a row view of the fused weight), so the trainer's weight
sync writes them directly. The arithmetic follows transformers' Qwen3 (fp32 RMSNorm, RoPE, q/k norms); tests
compare it with transformers' own model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("qwen3",)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, bias = cfg.hidden_size, bool(getattr(cfg, "attention_bias", False))
        self.sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        self.qkv_proj = nn.Linear(h, sum(self.sizes), bias=bias)  # q, k, v in one GEMM (see hf_views)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        d, kv = self.head_dim, self.kv_heads
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = self.q_norm(q.view(b, t, self.heads, d)).transpose(1, 2)
        k = self.k_norm(k.view(b, t, kv, d)).transpose(1, 2)
        v = v.view(b, t, kv, d).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        cache_k.index_copy_(2, slots, k)
        cache_v.index_copy_(2, slots, v)
        # Grouped-query attention without copying K/V per query head: query head h reads KV head h // G
        # (transformers' repeat_kv), so the G heads of one KV head attend as G*t rows of that head (`mask` is
        # already repeated G times along its rows).
        q = q.reshape(b, kv, self.heads // kv * t, d)
        out = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask, scale=d**-0.5)
        return self.o_proj(out.view(b, self.heads, t, d).transpose(1, 2).reshape(b, t, self.heads * d))


class MLP(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.sizes = [i, i]
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=False)  # gate and up in one GEMM (see hf_views)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.sizes, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


# Fused parameters and the HF parameters they hold, in row order: (fused name, HF names).
_FUSED = (
    ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
)


def _rope_theta(cfg: Any) -> float:
    """RoPE base of a config; only plain RoPE is implemented (scaled variants are refused by name)."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(
            f"rollout.engine 'torch': rope_type {kind!r} is not implemented (only 'default'); use rollout.engine: vllm"
        )
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


class Qwen3Decoder(nn.Module):
    """Dense Qwen3 causal LM over a static KV cache. `forward` returns the last position's logits."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"rollout.engine 'torch': model_type {cfg.model_type!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}); use rollout.engine: vllm"
            )
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("rollout.engine 'torch': use_sliding_window is not implemented; use rollout.engine: vllm")
        theta = _rope_theta(cfg)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tied = bool(cfg.tie_word_embeddings)
        self.tie_weights()
        self._theta = theta
        self.kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        self.query_groups = cfg.num_attention_heads // cfg.num_key_value_heads
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)  # see reset_buffers
        self.cache_k: list[torch.Tensor] = []
        self.cache_v: list[torch.Tensor] = []

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """Every weight under its Hugging Face name: fused q/k/v and gate/up appear as their row views (a copy
        into a view writes the fused weight), a tied head under both names."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            for fused, parts in _FUSED:
                if f".{fused}." in name:
                    owner = self.get_submodule(name[: name.index(fused)] + fused.split(".")[0])  # attention / MLP
                    for part, view in zip(parts, p.split(owner.sizes, dim=0)):
                        out[name.replace(fused, part)] = view
                    break
            else:
                out[name] = p
        return out

    def tie_weights(self) -> None:
        """A tied head IS the embedding (one tensor, so a sync of the embedding moves both). Called again
        after moves that make new parameters (to_empty, device changes)."""
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def allocate_cache(self, batch: int, length: int) -> None:
        """Zeroed K/V for `batch` rows of `length` slots per layer, at fixed addresses (CUDA-graph inputs)."""
        self.cache_k, self.cache_v = [], []
        w = self.lm_head.weight
        for _ in self.model.layers:
            for cache in (self.cache_k, self.cache_v):
                t = torch.zeros(batch, self.kv_heads, length, self.head_dim, dtype=w.dtype, device=w.device)
                torch._dynamo.mark_static_address(t)
                cache.append(t)

    def release_cache(self) -> None:
        self.cache_k, self.cache_v = [], []

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, pads: torch.Tensor
    ) -> torch.Tensor:
        """ids, positions [B, T]: tokens and their RoPE positions, written to cache slots `slots` [T]; a row's
        first `pads[b]` slots are left padding. Returns the logits of the last of the T positions, [B, V]."""
        length = self.cache_k[0].shape[2]
        x = self.model.embed_tokens(ids)
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        cols = torch.arange(length, device=ids.device)
        # A slot sees the slots up to itself that are not padding; a padding slot sees only itself, so no
        # softmax row is empty (an empty row is NaN, and NaN times a zero weight stays NaN).
        mask = (cols <= slots[:, None])[None] & ((cols >= pads[:, None, None]) | (cols == slots[:, None])[None])
        mask = mask[:, None].repeat(1, 1, self.query_groups, 1)  # [B, 1, G*T, L]: see Attention.forward
        for i, layer in enumerate(self.model.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, slots, mask, self.cache_k[i], self.cache_v[i])
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.model.norm(x[:, -1]))

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """RoPE frequencies (fp32 whatever the weights' dtype) on the weights' device."""
        d, device = self.head_dim, self.lm_head.weight.device
        self.inv_freq = 1.0 / self._theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)

    @torch.no_grad()
    def init_random(self, seed: int) -> None:
        """Random weights for load_format 'dummy' (the trainer's first sync replaces them): N(0, 0.02),
        norms 1."""
        g = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)


def build_decoder(cfg: Any, dtype: torch.dtype, device: torch.device, *, random: bool, seed: int = 0) -> Qwen3Decoder:
    """The decoder on `device` in `dtype`, for inference. Weights are left unset (no init cost for a model
    about to be loaded) unless `random`."""
    with torch.device("meta"):
        model = Qwen3Decoder(cfg)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    model.reset_buffers()
    if random:
        model.init_random(seed)
    return model.requires_grad_(False).eval()
