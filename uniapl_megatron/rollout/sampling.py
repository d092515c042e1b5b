"""Sampling pieces shared by the engines: request checks, per-sample seeds, and the torch engine's sampler.

Every sample (prompt i, sample j) gets its own seed derived from the request's seed, so a sample does not
depend on what else is in the batch: same seed, same samples, in any batch order or batch size.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .base import SamplingParams

GREEDY_EPS = 1e-5  # temperatures below this mean greedy (vLLM's threshold too)
_M64 = (1 << 64) - 1
_M32 = 0xFFFFFFFF


def check_request(
    prompts: Sequence[Sequence[int]], params: SamplingParams, vocab_size: int, max_model_len: int
) -> None:
    """Raise ValueError naming the bad field or prompt; engines call this before any work."""

    def bad(field: str, expected: str, value: object) -> ValueError:
        return ValueError(f"SamplingParams.{field}: expected {expected}, got {value!r}")

    if not isinstance(params.n, int) or params.n < 1:
        raise bad("n", "an integer >= 1", params.n)
    if not isinstance(params.temperature, (int, float)) or params.temperature < 0:
        raise bad("temperature", "a number >= 0", params.temperature)
    if not isinstance(params.top_p, (int, float)) or not 0.0 < params.top_p <= 1.0:
        raise bad("top_p", "a number in (0, 1]", params.top_p)
    if not isinstance(params.top_k, int) or params.top_k < 0:
        raise bad("top_k", "an integer >= 0 (0 = off)", params.top_k)
    if not isinstance(params.max_new_tokens, int) or params.max_new_tokens < 1:
        raise bad("max_new_tokens", "an integer >= 1", params.max_new_tokens)
    if params.seed is not None and (not isinstance(params.seed, int) or params.seed < 0):
        raise bad("seed", "None or an integer >= 0", params.seed)
    if not isinstance(params.prompt_index_offset, int) or params.prompt_index_offset < 0:
        raise bad("prompt_index_offset", "an integer >= 0", params.prompt_index_offset)
    for t in params.stop_token_ids:
        if not isinstance(t, int) or not 0 <= t < vocab_size:
            raise bad("stop_token_ids", f"token ids in [0, {vocab_size})", params.stop_token_ids)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i}: empty (at least one token id is needed)")
        if len(p) + params.max_new_tokens > max_model_len:
            raise ValueError(
                f"prompt {i}: {len(p)} tokens + max_new_tokens {params.max_new_tokens} exceeds "
                f"max_model_len {max_model_len} (rollout.max_model_len)"
            )
        for t in p:
            if not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"prompt {i}: token id {t!r} is not in [0, {vocab_size})")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def base_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random one when it has none."""
    return seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1


def sample_seed(base: int, prompt_index: int, sample_index: int) -> int:
    """Seed of sample j of prompt i: a hash of (base, i, j), in [0, 2**63)."""
    return _splitmix64(_splitmix64(_splitmix64(base) ^ prompt_index) ^ sample_index) >> 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer hash (Wellons' lowbias32) in int64 arithmetic; masking keeps the low 32 bits, which
    # are exact even when a product wraps.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def seed_tensor(seeds: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Per-row seeds as [B, 2] int64 halves (31 bits each), the form `uniforms` takes."""
    rows = [[(s >> 32) & 0x7FFFFFFF, s & _M32] for s in seeds]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def uniforms(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) per row for decode step `step`: a counter-based draw, no generator state.

    Vectorised and free of host syncs, so it can sit inside a compiled / CUDA-graph decode step.
    """
    h = _mix32(seeds[:, 1] ^ _mix32(seeds[:, 0] ^ _mix32(torch.as_tensor(step, device=seeds.device) + 0x9E3779B9)))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) on temperature-scaled fp32 logits; dropped tokens get -inf."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor, step: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its log-prob for each row, from raw last-position logits [B, V].

    The log-prob is that of the distribution sampled from: temperature-scaled, then top-k/top-p filtered
    and renormalised (vLLM's "processed_logprobs"). Greedy (temperature ~ 0) reports log_softmax(logits).
    """
    logits = logits.float()
    if params.temperature < GREEDY_EPS:
        logprobs = logits.log_softmax(dim=-1)
        token = logits.argmax(dim=-1)
    else:
        logprobs = filter_logits(logits / params.temperature, params.top_k, params.top_p).log_softmax(dim=-1)
        token, _ = inverse_cdf_draw(logprobs, uniforms(seeds, step))
    return token, logprobs.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def inverse_cdf_draw(
    logweights: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of fp32 log-weights [B, V] (log-probs up to a per-row constant; filtered tokens at
    -inf, the largest entry not far above 0), from one uniform in [0, 1) per row; also each row's total weight.

    Exact sampling that needs one random number per row, where Gumbel-max needs one per vocabulary entry.
    `out` ([B, V] fp32) takes the cumulative weights: on a CPU, reusing it saves the page faults of a fresh
    allocation this large every step.
    """
    cdf = torch.exp(logweights, out=out)
    torch.cumsum(cdf, dim=-1, out=cdf)
    total = cdf[:, -1]
    # right=True never lands on a zero-weight (filtered) token.
    token = torch.searchsorted(cdf, (u.to(cdf.dtype) * total).unsqueeze(-1), right=True).squeeze(-1)
    return token.clamp_(max=logweights.shape[-1] - 1), total
