"""Loss terms of the UniAPL step, on one flat (packed) micro-batch.

Every term returns ``(contribution, metrics)``. The contribution is already divided by the
global counts of the whole optimizer step (``aggregation.GlobalCounts``), so the trainer sums
contributions over micro-batches and data-parallel ranks and gets the step's loss and gradient
exactly: backward each micro-batch's loss as it is, and let the DP gradient reduction *sum*
(if the DDP wrapper averages over DP ranks, multiply the loss by the DP size first).

Metrics are detached 0-d tensors normalised the same way (global token means over the
population they describe), so they too are summed over micro-batches and ranks.

Sign convention: contributions are losses to minimise. The total is

    w_sft * sft + w_rl * pg(A_task) + lambda_adv * pg(A_adv) + kl_coef * kl - entropy_coef * entropy
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from uniapl_megatron.distributed import collective_device
from uniapl_megatron.objective.aggregation import GlobalCounts, per_token, token_weights, trained_token_mask
from uniapl_megatron.objective.config import ObjectiveConfig
from uniapl_megatron.objective.presets import StepWeights

Metrics = dict[str, torch.Tensor]
_MAX_LOG_RATIO = 20.0  # log-ratios are clamped before exp so one stray token cannot overflow to inf
# k3's value is capped (verl caps it at 10 too): past the cap a token's term is a constant with no gradient,
# where the exp-input clamp alone would leave exp(20) + d, whose gradient has the wrong sign.
MAX_K3 = 10.0


@dataclass(kw_only=True)
class LossInputs:
    """One micro-batch, flat: T tokens of S packed sequences (a sequence never spans micro-batches).

    The trainer builds one per packed micro-batch before the forward pass (trainer/batch.py), without the
    model's outputs; the loss callback completes it with :meth:`with_outputs`.
    """

    logprobs: torch.Tensor | None = None  # [T] log-probs (with grad): rollouts at the sampling temperature, demos at 1
    loss_mask: torch.Tensor  # [T] 1 for trained tokens (responses), 0 for prompt and padding
    seq_ids: torch.Tensor  # [T] index 0..S-1 of the token's sequence in this micro-batch, -1 for padding
    is_demo: torch.Tensor  # [S] True: teacher demonstration (SFT); False: rollout (policy gradient)
    advantages: torch.Tensor | None = None  # [S] task advantages of rollouts (demo entries ignored)
    adv_advantages: torch.Tensor | None = None  # [S] adversarial advantages of rollouts
    old_logprobs: torch.Tensor | None = None  # [T] log-probs before this update; None: on-policy (= logprobs)
    ref_logprobs: torch.Tensor | None = None  # [T] frozen reference model's log-probs (KL term)
    engine_logprobs: torch.Tensor | None = None  # [T] rollout engine's sampling log-probs (TIS)
    entropy: torch.Tensor | None = None  # [T] policy entropy at each position (entropy bonus)
    seq_token_counts: torch.Tensor | None = None  # [S] full trained-token count per sequence (context parallel)

    def with_outputs(self, logprobs: torch.Tensor, entropy: torch.Tensor | None = None) -> "LossInputs":
        """These inputs completed with the forward pass's [T] log-probs (and entropy)."""
        return dataclasses.replace(self, logprobs=logprobs, entropy=entropy)

    def validate(self) -> None:
        """Raise ValueError naming the field whose shape or type is wrong."""
        lp = self.logprobs
        if lp is None:
            raise ValueError("LossInputs.logprobs: required (with_outputs adds the forward pass's log-probs)")
        if not isinstance(lp, torch.Tensor) or lp.dim() != 1:
            raise ValueError(f"LossInputs.logprobs: expected a 1-D tensor [T], got {getattr(lp, 'shape', lp)!r}")
        if not lp.is_floating_point():
            raise ValueError(f"LossInputs.logprobs: expected a float tensor, got {lp.dtype}")
        t = lp.numel()
        for name in ("loss_mask", "seq_ids", "old_logprobs", "ref_logprobs", "engine_logprobs", "entropy"):
            _check_shape(name, getattr(self, name), t, "T", "logprobs")
        if self.seq_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"LossInputs.seq_ids: expected an integer tensor, got {self.seq_ids.dtype}")
        if not isinstance(self.is_demo, torch.Tensor) or self.is_demo.dim() != 1:
            raise ValueError("LossInputs.is_demo: expected a 1-D tensor [S] (one flag per sequence)")
        s = self.is_demo.numel()
        for name in ("advantages", "adv_advantages", "seq_token_counts"):
            _check_shape(name, getattr(self, name), s, "S", "is_demo")
        if t and (int(self.seq_ids.min()) < -1 or int(self.seq_ids.max()) >= s):
            raise ValueError(
                f"LossInputs.seq_ids: values must lie in [-1, {s - 1}] (S = {s} sequences), "
                f"got [{int(self.seq_ids.min())}, {int(self.seq_ids.max())}]"
            )
        if t and bool(((self.loss_mask > 0) & (self.seq_ids < 0)).any()):
            raise ValueError("LossInputs.loss_mask: a trained token has seq_id -1 (it must belong to a sequence)")


def _check_shape(name: str, x: torch.Tensor | None, n: int, sym: str, like: str) -> None:
    if x is None:
        if name in ("loss_mask", "seq_ids"):
            raise ValueError(f"LossInputs.{name}: required")
        return
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.numel() != n:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"LossInputs.{name}: expected shape [{sym}]=[{n}] like {like}, got {got}")


def seq_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """[T] sequence index of each token from packed boundaries [S+1]; tokens past the end get -1."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    pad = total_tokens - ids.numel()
    if pad < 0:
        raise ValueError(f"seq_ids_from_cu_seqlens: cu_seqlens covers {ids.numel()} tokens > total {total_tokens}")
    return torch.cat([ids, torch.full((pad,), -1, dtype=ids.dtype, device=ids.device)])


# --- per-token pieces (pure functions, no aggregation) -------------------------------------------


def clipped_pg_per_token(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped loss per token: max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), r = pi / pi_old.

    Dual clip caps the loss of negative-advantage tokens at c * |A|; ``is_weights`` (TIS)
    multiply the result. Returns (loss [T], clipped [T] bool, dual-clipped [T] bool).
    """
    ratio = torch.exp((logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    dual = torch.zeros_like(was_clipped)
    if dual_clip_c is not None:
        cap = -advantages * dual_clip_c
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
    if is_weights is not None:
        loss = loss * is_weights
    return loss, was_clipped, dual


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from sampled tokens (Schulman's k1, k2, k3).

    k3 is capped at ``MAX_K3``: a token whose policy has moved far from the reference (either way) adds at
    most MAX_K3 and no gradient, instead of a value near exp(20) whose gradient pushes it further away.
    """
    d = logprobs - ref_logprobs  # log(pi / ref)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return (torch.exp((-d).clamp(max=_MAX_LOG_RATIO)) - 1.0 + d).clamp(min=0.0, max=MAX_K3)
    raise ValueError(f"kl_per_token: estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def tis_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_engine, cap), no gradient."""
    log_w = (old_logprobs - engine_logprobs).detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_w).clamp(max=cap)


# --- terms (contribution already globally normalised, plus summable metrics) --------------------


class _View:
    """The micro-batch's tensors with untrained positions zeroed, so garbage there (e.g. old
    log-probs of prompt tokens) can never turn into inf or NaN, in values or gradients."""

    def __init__(self, inputs: LossInputs, counts: GlobalCounts, cfg: ObjectiveConfig):
        self.inputs = inputs
        self.valid = trained_token_mask(inputs)
        mode, n = cfg.loss_agg_mode, cfg.agg_norm_length
        self.w_demo = token_weights(inputs, counts, demos=True, mode=mode, norm_length=n)
        self.w_roll = token_weights(inputs, counts, demos=False, mode=mode, norm_length=n)
        # Token means for metrics, whatever the loss's mode.
        self.m_demo = token_weights(inputs, counts, demos=True, mode="token-mean")
        self.m_roll = token_weights(inputs, counts, demos=False, mode="token-mean")
        self.has_demo_tokens = bool((self.m_demo > 0).any())
        self.has_rollout_tokens = bool((self.m_roll > 0).any())

    def tok(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.valid, x, torch.zeros_like(x))

    def per_seq(self, x: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-sequence value [S] to tokens [T]."""
        lp = self.inputs.logprobs
        return self.tok(per_token(x.to(device=lp.device, dtype=lp.dtype), self.inputs.seq_ids))

    def old(self) -> torch.Tensor:
        i = self.inputs
        return self.tok(i.old_logprobs) if i.old_logprobs is not None else self.tok(i.logprobs).detach()


def _mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values.detach() * weights).sum()


def sft_term(view: _View, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Metrics]:
    """Negative log-likelihood of demonstration tokens (CHORD-phi weighted when configured)."""
    logp = view.tok(view.inputs.logprobs)
    nll = -logp
    if cfg.sft_token_weighting == "chord_phi":
        p = logp.detach().exp()
        nll = nll * (p * (1.0 - p))
    return (nll * view.w_demo).sum(), {"sft/nll": _mean(-logp, view.m_demo)}


def policy_gradient_term(
    view: _View, advantages: torch.Tensor, cfg: ObjectiveConfig, prefix: str
) -> tuple[torch.Tensor, Metrics]:
    """Clipped policy-gradient loss of rollout tokens for per-sequence advantages [S]."""
    i = view.inputs
    logp, old = view.tok(i.logprobs), view.old()
    is_w = None
    if cfg.tis_cap is not None:
        is_w = tis_weights(old, view.tok(i.engine_logprobs), cfg.tis_cap)
    loss, clipped, dual = clipped_pg_per_token(
        logp,
        old,
        view.per_seq(advantages),
        eps_low=cfg.clip_eps_low,
        eps_high=cfg.clip_eps_high,
        dual_clip_c=cfg.dual_clip_c,
        is_weights=is_w,
    )
    metrics = {f"{prefix}/clip_frac": _mean(clipped.float(), view.m_roll)}
    if cfg.dual_clip_c is not None:
        metrics[f"{prefix}/dual_clip_frac"] = _mean(dual.float(), view.m_roll)
    return (loss * view.w_roll).sum(), metrics


def kl_term(view: _View, cfg: ObjectiveConfig) -> tuple[torch.Tensor, Metrics]:
    """KL(pi || ref) estimate over rollout tokens."""
    i = view.inputs
    kl = kl_per_token(view.tok(i.logprobs), view.tok(i.ref_logprobs), cfg.kl_estimator)
    return (kl * view.w_roll).sum(), {"kl": _mean(kl, view.m_roll)}


def entropy_term(view: _View) -> tuple[torch.Tensor, Metrics]:
    """Minus the entropy of rollout tokens (minimising it raises entropy)."""
    ent = view.tok(view.inputs.entropy)
    return -(ent * view.w_roll).sum(), {"entropy": _mean(ent, view.m_roll)}


def _require(inputs: LossInputs, field: str, why: str) -> None:
    if getattr(inputs, field) is None:
        raise ValueError(f"LossInputs.{field} is needed: {why}")


def objective_loss(
    inputs: LossInputs, weights: StepWeights, cfg: ObjectiveConfig, counts: GlobalCounts
) -> tuple[torch.Tensor, Metrics]:
    """This micro-batch's share of the step's loss, and its share of the step's metrics.

    ``counts`` must be the step's global counts (``aggregation.step_counts``) and ``weights``
    the step's resolved preset (``presets.resolve_weights``).
    """
    inputs.validate()
    view = _View(inputs, counts, cfg)
    loss = view.tok(inputs.logprobs).sum() * 0.0  # keeps the graph when every term is off here
    metrics: Metrics = {}

    def add(name: str, weight: float, term: tuple[torch.Tensor, Metrics]) -> None:
        nonlocal loss
        value, term_metrics = term
        loss = loss + weight * value
        metrics[f"loss/{name}"] = (weight * value).detach()
        metrics.update(term_metrics)

    if weights.w_sft > 0 and view.has_demo_tokens:
        add("sft", weights.w_sft, sft_term(view, cfg))
    if weights.needs_rollouts and view.has_rollout_tokens:
        stage = f"stage {weights.stage!r}"
        if cfg.tis_cap is not None:
            _require(inputs, "engine_logprobs", f"tis_cap={cfg.tis_cap} corrects against the engine's log-probs")
        if weights.w_rl > 0:
            _require(inputs, "advantages", f"{stage} trains rollouts with w_rl={weights.w_rl}")
            add("pg", weights.w_rl, policy_gradient_term(view, inputs.advantages, cfg, "pg"))
        if weights.lambda_adv > 0:
            _require(inputs, "adv_advantages", f"{stage} has the adversarial term (lambda_adv={weights.lambda_adv})")
            add("adv", weights.lambda_adv, policy_gradient_term(view, inputs.adv_advantages, cfg, "adv"))
        if cfg.kl_coef > 0:
            _require(inputs, "ref_logprobs", f"kl_coef={cfg.kl_coef}")
            add("kl", cfg.kl_coef, kl_term(view, cfg))
        if cfg.entropy_coef > 0:
            _require(inputs, "entropy", f"entropy_coef={cfg.entropy_coef}")
            add("entropy", cfg.entropy_coef, entropy_term(view))
        log_ratio = (view.tok(inputs.logprobs) - view.old()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        metrics["ratio/mean"] = _mean(torch.exp(log_ratio), view.m_roll)
        if cfg.tis_cap is not None:
            w = tis_weights(view.old(), view.tok(inputs.engine_logprobs), cfg.tis_cap)
            metrics["tis/capped_frac"] = _mean((w >= cfg.tis_cap).float(), view.m_roll)
    metrics["loss/total"] = loss.detach()
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    for name in metric_names(weights, cfg):  # same keys on every micro-batch and rank
        metrics.setdefault(name, zero)
    return loss, metrics


def metric_names(weights: StepWeights, cfg: ObjectiveConfig) -> list[str]:
    """The metric keys objective_loss returns for a step (they depend on the step, not the batch)."""
    names = ["loss/total"]
    if weights.w_sft > 0:
        names += ["loss/sft", "sft/nll"]
    if weights.needs_rollouts:
        names.append("ratio/mean")
        for prefix, w in (("pg", weights.w_rl), ("adv", weights.lambda_adv)):
            if w > 0:
                names += [f"loss/{prefix}", f"{prefix}/clip_frac"]
                if cfg.dual_clip_c is not None:
                    names.append(f"{prefix}/dual_clip_frac")
        if cfg.kl_coef > 0:
            names += ["loss/kl", "kl"]
        if cfg.entropy_coef > 0:
            names += ["loss/entropy", "entropy"]
        if cfg.tis_cap is not None:
            names.append("tis/capped_frac")
    return names


def sum_metrics(
    per_micro_batch: Sequence[Mapping[str, torch.Tensor | float]],
    group: dist.ProcessGroup | None = None,
    keys: Sequence[str] | None = None,
) -> dict[str, float]:
    """The step's metrics: summed over micro-batches, then over ``group`` (None: no communication).

    Every rank must reduce the same keys: objective_loss gives every micro-batch the same ones for a step, and
    ``keys`` (``metric_names``) names them where a rank may hold no micro-batch (an earlier pipeline stage, or a
    rank whose metrics another one reports); a metric outside ``keys`` is an error, not dropped.
    """
    found = {k for m in per_micro_batch for k in m}
    if keys is not None and not found <= set(keys):
        raise ValueError(f"sum_metrics: metrics {sorted(found - set(keys))} are not among keys {sorted(keys)}")
    names = sorted(found if keys is None else set(keys))
    totals = torch.zeros(len(names), dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    for m in per_micro_batch:
        totals += torch.stack([torch.as_tensor(m[k]).detach().double().cpu() if k in m else zero for k in names])
    if group is not None and names:
        totals = totals.to(collective_device(group))
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(names, (float(x) for x in totals.cpu().tolist())))
