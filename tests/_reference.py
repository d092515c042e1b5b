"""Reference answers from a plain transformers forward (no KV cache, no engine) that the rollout engines'
outputs are checked against."""

from __future__ import annotations

import torch

from uniapl_megatron.rollout import SamplingParams


def filtered(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p on [B, V] temperature-scaled logits, dropped tokens at -inf: transformers' own logits
    warpers, in generate's order, so the check does not lean on the project's filter (rollout/sampling.py)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    if top_k > 0:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return logits


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The n greedy tokens after prompt, one full forward per token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], tokens: list[int], params: SamplingParams) -> torch.Tensor:
    """Log-prob of each of tokens after prompt under the distribution params samples from (temperature,
    top-k, top-p applied); temperature 0 (greedy) gives those of the raw logits."""
    logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    if params.temperature > 0:
        logits = filtered(logits / params.temperature, params.top_k, params.top_p)
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
