"""Log-probs (and entropy) of target tokens, vocab-parallel and in chunks.

The full [tokens x vocab] logits are never materialised: each TP rank multiplies a chunk of hidden
states by its vocabulary slice, the log-sum-exp is combined over the TP group, and in backward each chunk's
logits are recomputed (activation checkpointing per chunk). Qwen3's vocabulary is 151,936 entries: full fp32
logits of 16k tokens alone are ~10 GB. Computed in fp32, at one temperature or one per target token (the
trainer scores rollout tokens at the sampler's temperature and demonstration tokens at 1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

_MASKED = -1e30  # logit of vocabulary padding rows: exp() is 0 and 0 * it is 0 (unlike -inf)


def _chunk(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor,
    vocab_start: int, true_vocab: int, group: object, tp_size: int, with_entropy: bool,
) -> torch.Tensor:
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region as tp_sum

    logits = (hidden @ weight.t()).float()
    if isinstance(temperature, torch.Tensor):
        logits = logits / temperature.to(device=logits.device, dtype=logits.dtype).unsqueeze(-1)
    elif temperature != 1.0:
        logits = logits / temperature
    v_local = logits.shape[-1]
    valid = true_vocab - vocab_start
    if valid < v_local:
        logits[:, max(valid, 0):] = _MASKED
    m = logits.detach().max(dim=-1).values
    if tp_size > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    z = logits - m.unsqueeze(-1)
    exp = z.exp()
    sumexp = exp.sum(-1)
    local = labels - vocab_start
    in_range = (local >= 0) & (local < v_local)
    picked = z.gather(1, local.clamp(0, v_local - 1).unsqueeze(1)).squeeze(1) * in_range
    if tp_size > 1:
        sumexp, picked = tp_sum(sumexp), tp_sum(picked)
    lse = sumexp.log()
    logprob = picked - lse
    if not with_entropy:
        return logprob
    pz = (exp * z).sum(-1)
    if tp_size > 1:
        pz = tp_sum(pz)
    entropy = lse - pz / sumexp
    return torch.stack([logprob, entropy], dim=-1)


def vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    true_vocab: int,
    temperature: float | torch.Tensor = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = 2048,
    tp_group: object = None,
) -> torch.Tensor:
    """hidden [N, h] (full sequence on every TP rank), weight [V/tp, h] this rank's vocab slice,
    labels [N] global ids -> log-probs [N] (or [N, 2] with entropy), identical on every TP rank.
    ``temperature``: one for all tokens, or [N], each target's own (the entropy is taken at it too).

    Gradients: hidden gets this rank's partial gradient (the caller's TP region mapping sums them), weight
    gets its slice's gradient.
    """
    tp_size = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    tp_rank = dist.get_rank(tp_group) if tp_size > 1 else 0
    vocab_start = tp_rank * weight.shape[0]
    outs = []
    # One chunk is the head's whole activation either way: recomputing it in backward would only cost time.
    recompute = hidden.shape[0] > chunk_tokens
    per_token = isinstance(temperature, torch.Tensor)
    if per_token and temperature.shape != labels.shape:
        raise ValueError(f"vocab_parallel_logprobs: temperature has shape {tuple(temperature.shape)}, expected one "
                         f"value per label {tuple(labels.shape)} or a number")
    for s in range(0, hidden.shape[0], chunk_tokens):
        temp = temperature[s : s + chunk_tokens] if per_token else temperature
        args = (hidden[s : s + chunk_tokens], weight, labels[s : s + chunk_tokens], temp, vocab_start,
                true_vocab, tp_group, tp_size, with_entropy)
        if recompute and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            outs.append(checkpoint(_chunk, *args, use_reentrant=False))
        else:
            outs.append(_chunk(*args))
    return torch.cat(outs) if outs else hidden.new_zeros((0, 2) if with_entropy else (0,), dtype=torch.float32)


class LogprobHead:
    """Turns a GPTModel's output layer into a log-prob head for one forward call.

    ``head.targets = (labels [b, s], temperature (a number or [b, s]), with_entropy, mask [b, s] | None)``
    before ``model(...)``;
    the model then returns log-probs [b, s] (or [b, s, 2] with entropy) instead of logits. Where ``mask`` is
    0 (prompt tokens, padding) the vocabulary projection is skipped and 0 is returned: in RL batches most
    positions are prompt, and the 151,936-wide projection is the largest cost of a small model's step.
    """

    def __init__(self, model: torch.nn.Module, true_vocab: int, chunk_tokens: int = 2048) -> None:
        from megatron.core import parallel_state as ps

        self.layer = model.output_layer
        self.true_vocab = true_vocab
        self.chunk_tokens = chunk_tokens
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.targets: tuple[torch.Tensor, float | torch.Tensor, bool, torch.Tensor | None] | None = None
        self.layer.forward = self.forward  # instance attribute: only this model's head changes

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, None]:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        if self.targets is None:
            raise RuntimeError("LogprobHead: set .targets before the forward")
        labels, temperature, with_entropy, mask = self.targets
        w = weight if weight is not None else self.layer.weight
        if self.layer.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden)
        s, b, h = hidden.shape
        flat_labels = labels.transpose(0, 1).reshape(-1)  # [b, s] -> [s*b], hidden's order
        flat_hidden = hidden.reshape(s * b, h)
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.to(labels.device).transpose(0, 1).reshape(-1)
        idx = None
        if mask is not None:
            idx = mask.transpose(0, 1).reshape(-1).nonzero().squeeze(1)
            flat_hidden, flat_labels = flat_hidden[idx], flat_labels[idx]
            if isinstance(temperature, torch.Tensor):
                temperature = temperature[idx]
        out = vocab_parallel_logprobs(
            flat_hidden, w, flat_labels, true_vocab=self.true_vocab, temperature=temperature,
            with_entropy=with_entropy, chunk_tokens=self.chunk_tokens, tp_group=self.tp_group,
        )
        if idx is not None:
            full = out.new_zeros((s * b, *out.shape[1:]))
            out = full.index_put((idx,), out)
        return out.reshape(s, b, *out.shape[1:]), None
