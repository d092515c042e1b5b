"""Demonstrations are trained at temperature 1 and rollouts scored at the sampler's, within one mixed
micro-batch: the student's log-probs (TP2 + SP, vocab-parallel, chunked head) against a plain transformers
forward of the same weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from _models import tiny_qwen3

from uniapl_megatron.launch import run_ranks

WORKER = Path(__file__).resolve().parent / "workers" / "temperature.py"
T = 0.6


def test_demo_tokens_at_temperature_1_rollout_tokens_at_the_samplers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = tiny_qwen3(tmp_path / "m", tie=False, vocab=256)
    g = torch.Generator().manual_seed(3)
    lens, prompt_lens, demo = [14, 11, 17, 9], [5, 4, 6, 3], [True, False, True, False]
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]
    inp = tmp_path / "inp.json"
    inp.write_text(json.dumps({"seqs": seqs, "prompt_lens": prompt_lens, "demo": demo, "temperature": T}))
    out = tmp_path / "out.json"
    code = run_ranks(
        [sys.executable, str(WORKER), "--hf", str(hf_dir), "--inp", str(inp), "--out", str(out), "--tp", "2"],
        2,
        timeout=600,
    )
    assert code == 0
    got = json.loads(out.read_text())

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    nll = []
    with torch.no_grad():
        for s, p, d, lp in zip(seqs, prompt_lens, demo, got["logprobs"]):
            logits = hf(torch.tensor([s])).logits[0, p - 1 : -1].float()
            targets = torch.tensor(s[p:])[:, None]
            at_1 = logits.log_softmax(-1).gather(-1, targets)[:, 0]
            at_t = (logits / T).log_softmax(-1).gather(-1, targets)[:, 0]
            want, other = (at_1, at_t) if d else (at_t, at_1)
            assert (want - other).abs().max() > 1e-2  # the two temperatures are told apart
            diff = (torch.tensor(lp) - want).abs().max().item()
            assert diff <= 1e-5, f"{'demo' if d else 'rollout'}: log-probs differ from the reference by {diff}"
            if d:
                nll += (-at_1).tolist()
    # The SFT term the update trains on is the NLL at temperature 1 (token mean over the demo tokens).
    assert abs(got["sft/nll"] - sum(nll) / len(nll)) <= 1e-5, (got["sft/nll"], sum(nll) / len(nll))
