"""Small random Hugging Face Qwen3 models for tests (real transformers code, saved with save_pretrained)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _save(model, folder: Path) -> Path:
    import torch

    # Norm weights start at exactly 1.0: perturb them so a mapping mix-up cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


def tiny_qwen3(
    folder: Path,
    *,
    tie: bool = True,
    vocab: int = 300,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    hidden: int = 64,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tie,
        max_position_embeddings=512,
        rope_theta=10000.0,
    )
    model = Qwen3ForCausalLM(cfg).to(getattr(torch, dtype))
    return _save(model, folder)


def tiny_qwen3_moe(
    folder: Path,
    *,
    tie: bool = False,
    vocab: int = 300,
    layers: int = 2,
    experts: int = 4,
    topk: int = 2,
    seed: int = 0,
    tokenizer: bool = False,
) -> Path:
    """``tokenizer``: the real Qwen3 tokenizer files beside it and its vocabulary, so `uniapl train` can run it."""
    import shutil

    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from uniapl_megatron.data.chat import qwen3_tokenizer_dir
    from uniapl_megatron.demo import QWEN3_VOCAB

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=QWEN3_VOCAB if tokenizer else vocab,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=experts,
        num_experts_per_tok=topk,
        norm_topk_prob=True,
        tie_word_embeddings=tie,
        max_position_embeddings=512,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    _save(Qwen3MoeForCausalLM(cfg), folder)
    if tokenizer:
        for f in Path(qwen3_tokenizer_dir()).iterdir():
            if f.is_file():
                shutil.copy2(f, folder / f.name)
    return folder


def load_safetensors_folder(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
