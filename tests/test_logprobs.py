"""Vocab-parallel log-probs and entropy (trainer/logprobs.py) at TP2: values and gradients equal plain autograd
through the full logits."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from uniapl_megatron.launch import run_ranks

WORKER = Path(__file__).resolve().parent / "workers" / "logprobs_grad.py"


def test_vocab_parallel_logprobs_and_entropy_match_full_logits_at_tp2(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "grads.safetensors"
    # 20 tokens in chunks of 7: the chunked, recomputed backward; 64 vocabulary rows, 14 of them padding.
    assert run_ranks([sys.executable, str(WORKER), "--out", str(out), "--chunk-tokens", "7"], 2, timeout=600) == 0
    t = load_file(str(out))
    assert t["ref_grad_weight"][50:].abs().max() == 0  # padding rows are no vocabulary entry
    for name in ("out", "grad_hidden", "grad_weight"):
        got, ref = t[name].double(), t["ref_" + name].double()
        assert got.shape == ref.shape, name
        assert ref.abs().max() > 1e-2, f"{name}: the reference is trivially small"
        err = (got - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"{name} differs from autograd by {err}"
    assert torch.isfinite(t["grad_weight"]).all()
