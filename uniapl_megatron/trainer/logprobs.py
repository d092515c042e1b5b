"""Log-probs (and entropy) of target tokens, vocab-parallel, tiled over tokens and vocabulary.

Neither the full [tokens x vocab] logits nor a [chunk x full vocab] block ever exists. The forward walks
[rows x vocab tile] blocks of this rank's vocabulary slice (rows <= chunk_tokens; on a CPU a block holds ~2M
fp32 values, 8 MB, so it stays in cache between the matmul and the reductions; 128 MB on a GPU), keeping per row
an online max, sum of exponentials and (for the entropy) their logit-weighted sum; the TP group combines them
with one max and one sum all-reduce. It saves only per-row statistics. The backward recomputes each block's
logits and turns them into the gradient (softmax minus one-hot, and the entropy's -p (log p + H)), accumulating
the hidden and weight gradients block by block; per-row factors (upstream gradient, 1/T) go into the small
matmul operands, not the block. Qwen3's vocabulary is 151,936 entries: full fp32 logits of 16k tokens alone are
~10 GB. Logits and their statistics are fp32; the matmuls run in the weights' dtype (fp32 accumulation). The
cost is one extra logits matmul in backward (4 instead of 3), the price of O(tokens) memory. The design of fused
linear cross-entropy kernels (Liger-Kernel, Apple's "cut cross-entropy", TRL's chunked log-prob), here with
per-token upstream gradients, an entropy output, per-token temperature and Megatron's vocab-parallel layout.
Temperature is one value or one per target token (the trainer scores rollout tokens at the sampler's temperature
and demonstration tokens at 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

_BLOCK_VALUES = 1 << 21  # fp32 values of one [rows x vocab tile] block on a CPU (8 MB: stays in cache)
_BLOCK_VALUES_GPU = 1 << 25  # on a GPU (128 MB): fewer, larger kernels
_FLOOR = torch.finfo(torch.float32).min  # the running max before any column: exp(_FLOOR - m) is 0, never NaN


@dataclass(frozen=True)
class _Layout:
    vocab_start: int  # global id of this rank's first vocabulary row
    valid: int  # rows of this rank's slice that are real vocabulary (the rest is padding, never scored)
    group: object
    tp_size: int
    with_entropy: bool
    chunk: int  # token rows per block
    tile: int  # vocab columns per block


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _scaled(h: torch.Tensor, inv_t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows for the logits matmul, per-row factor still to apply to its fp32 output): 1/T is folded into h once
    per row block when h is fp32, and applied to the fp32 logits otherwise (no rounding of h / T to bf16)."""
    if inv_t is not None and h.dtype == torch.float32:
        return h * inv_t.unsqueeze(-1), None
    return h, inv_t


def _logits(h: torch.Tensor, w: torch.Tensor, post: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of one block (``h`` and ``post`` from _scaled)."""
    z = (h @ w.t()).float()
    return z if post is None else z.mul_(post.unsqueeze(-1))


def _local_labels(labels: torch.Tensor, lay: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of each label in this rank's slice, 0 where it lies elsewhere; whether it lies here)."""
    local = labels - lay.vocab_start
    in_range = (local >= 0) & (local < lay.valid)
    return torch.where(in_range, local, torch.zeros_like(local)), in_range


def _row_stats(
    h: torch.Tensor, weight: torch.Tensor, inv_t: torch.Tensor | None, lay: _Layout
) -> tuple[torch.Tensor, ...]:
    """Per row over this rank's valid vocabulary: max m, sum of exp(z - m), and sum of exp(z - m) (z - m)."""
    n = h.shape[0]
    m = torch.full((n,), _FLOOR, dtype=torch.float32, device=h.device)
    s, a = torch.zeros_like(m), torch.zeros_like(m)
    for r0, r1 in _blocks(n, lay.chunk):
        mc, sc, ac = m[r0:r1], s[r0:r1], a[r0:r1]  # views: updated in place
        hs, post = _scaled(h[r0:r1], None if inv_t is None else inv_t[r0:r1])
        for v0, v1 in _blocks(lay.valid, lay.tile):
            z = _logits(hs, weight[v0:v1], post)
            m_new = torch.maximum(mc, z.max(-1).values)
            shift = mc - m_new  # <= 0: rescales what was summed against the old max
            scale = shift.exp()
            z.sub_(m_new.unsqueeze(-1))
            if lay.with_entropy:
                e = z.exp()
                ac.mul_(scale).add_(scale * shift * sc).add_(torch.einsum("ij,ij->i", e, z))
            else:
                e = z.exp_()
            sc.mul_(scale).add_(e.sum(-1))
            mc.copy_(m_new)
    return m, s, a


def _combine(
    m: torch.Tensor, s: torch.Tensor, a: torch.Tensor, picked: torch.Tensor, lay: _Layout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TP-combined (log-sum-exp, picked logit, entropy) per row."""
    if lay.tp_size > 1:
        big = m.clone()
        dist.all_reduce(big, op=dist.ReduceOp.MAX, group=lay.group)
        shift = m - big
        scale = shift.exp()
        sums = torch.stack([s * scale, scale * (a + shift * s), picked])
        dist.all_reduce(sums, group=lay.group)
        m, (s, a, picked) = big, sums
    lse = m + s.log()
    return lse, picked, s.log() - a / s


class _TiledLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, inv_t: torch.Tensor | None, lay: _Layout
    ) -> torch.Tensor:
        m, s, a = _row_stats(hidden, weight, inv_t, lay)
        local, in_range = _local_labels(labels, lay)
        picked = (hidden.float() * weight[local].float()).sum(-1) * in_range
        if inv_t is not None:
            picked = picked * inv_t
        lse, picked, entropy = _combine(m, s, a, picked, lay)
        ctx.lay = lay
        ctx.save_for_backward(hidden, weight, labels, inv_t, lse, entropy if lay.with_entropy else None)
        logprob = picked - lse
        return torch.stack([logprob, entropy], dim=-1) if lay.with_entropy else logprob

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels, inv_t, lse, entropy = ctx.saved_tensors
        lay: _Layout = ctx.lay
        # With z = (h w) / T and x = h w: dL/dz = g_lp (onehot - p) - g_h p (log p + H), and dL/dx = dL/dz / T.
        # So dL/dx = onehot g_lp / T + c u, u = p (or p (alpha + g_h log p) with entropy), c a per-row factor.
        g_lp = (grad[:, 0] if lay.with_entropy else grad).float()
        inv = inv_t if inv_t is not None else torch.ones_like(g_lp)
        if lay.with_entropy:
            g_h = grad[:, 1].float()
            alpha, coef = g_lp + g_h * entropy, -inv
        else:
            g_h = alpha = None
            coef = -g_lp * inv
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for r0, r1 in _blocks(hidden.shape[0], lay.chunk):
            rows = slice(r0, r1)
            _backward_rows(
                hidden[rows],
                weight,
                None if inv_t is None else inv_t[rows],
                lse[rows],
                None if g_h is None else (alpha[rows], g_h[rows]),
                coef[rows],
                None if gh is None else gh[rows],
                gw,
                lay,
            )
        local, in_range = _local_labels(labels, lay)
        g_pick = (g_lp * inv * in_range).unsqueeze(-1)  # the one-hot part
        if gh is not None:
            gh.add_(weight[local].float() * g_pick)
        if gw is not None:
            gw.index_add_(0, local, hidden.float() * g_pick)
        return (
            None if gh is None else gh.to(hidden.dtype),
            None if gw is None else gw.to(weight.dtype),
            None,
            None,
            None,
        )


def _backward_rows(
    h: torch.Tensor,
    weight: torch.Tensor,
    inv_t: torch.Tensor | None,
    lse: torch.Tensor,
    entropy_factors: tuple[torch.Tensor, torch.Tensor] | None,
    coef: torch.Tensor,
    gh: torch.Tensor | None,
    gw: torch.Tensor | None,
    lay: _Layout,
) -> None:
    """Accumulate one row block's softmax part of dL/dx into gh (its rows) and gw: c (u @ w) and u^T (c h)."""
    acc = torch.zeros(gh.shape, dtype=torch.float32, device=h.device) if gh is not None else None
    scaled_h = (h.float() * coef.unsqueeze(-1)).to(weight.dtype) if gw is not None else None
    hs, post = _scaled(h, inv_t)
    for v0, v1 in _blocks(lay.valid, lay.tile):
        w = weight[v0:v1]
        u = _logits(hs, w, post).sub_(lse.unsqueeze(-1))  # log p
        if entropy_factors is None:
            u = u.exp_()
        else:
            alpha, g_h = entropy_factors
            p = u.exp()
            u = u.mul_(g_h.unsqueeze(-1)).add_(alpha.unsqueeze(-1)).mul_(p)
        u = u.to(weight.dtype)
        if acc is not None:
            _acc(acc, u, w)
        if gw is not None:
            _acc(gw[v0:v1], u.t(), scaled_h)
    if gh is not None:
        gh.add_(acc.mul_(coef.unsqueeze(-1)))


def _acc(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, in place (fp32 accumulator; operands in the weights' dtype)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_((a @ b).float())


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

    ``temperature``: one value, or one per token ([N]; demo and rollout tokens of one micro-batch may be
    scored at different temperatures). ``chunk_tokens`` bounds the token rows of one block (a block holds about
    2M fp32 values on a CPU, 32M on a GPU, whatever its shape). Gradients: hidden gets this rank's partial
    gradient (the caller's TP region mapping sums them), weight gets its slice's gradient; vocabulary padding rows
    get none.
    """
    n = hidden.shape[0]
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: expected >= 1")
    inv_t = _inverse_temperature(temperature, n, hidden.device)
    tp_size = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    tp_rank = dist.get_rank(tp_group) if tp_size > 1 else 0
    vocab_start = tp_rank * weight.shape[0]
    valid = max(0, min(weight.shape[0], true_vocab - vocab_start))
    rows = max(1, min(chunk_tokens, n))
    block = _BLOCK_VALUES if hidden.device.type == "cpu" else _BLOCK_VALUES_GPU
    lay = _Layout(vocab_start, valid, tp_group, tp_size, with_entropy, rows, max(1, block // rows))
    return _TiledLogprobs.apply(hidden, weight, labels, inv_t, lay)


def _inverse_temperature(temperature: float | torch.Tensor, n: int, device: torch.device) -> torch.Tensor | None:
    """1 / T per token ([N] fp32), or None for T = 1 everywhere given as a number."""
    if isinstance(temperature, torch.Tensor):
        t = temperature.detach().to(device=device, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"temperature: expected one value or one per token ([{n}]), got shape {list(t.shape)}")
    else:
        if float(temperature) == 1.0:
            return None
        t = torch.full((n,), float(temperature), dtype=torch.float32, device=device)
    if not bool((t > 0).all()):
        raise ValueError(f"temperature: expected > 0, got min {t.min().item() if n else 'n/a'}")
    return 1.0 / t


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

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None
    ) -> tuple[torch.Tensor, None]:
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
            flat_hidden,
            w,
            flat_labels,
            true_vocab=self.true_vocab,
            temperature=temperature,
            with_entropy=with_entropy,
            chunk_tokens=self.chunk_tokens,
            tp_group=self.tp_group,
        )
        if idx is not None:
            full = out.new_zeros((s * b, *out.shape[1:]))
            out = full.index_put((idx,), out)
        return out.reshape(s, b, *out.shape[1:]), None
