"""The step's sequences as the student trains on them: demos and scored rollouts (Seq), packed into this data-
parallel rank's micro-batches with their per-sequence loss inputs, the global token / sequence counts the losses
are normalised by, and the loss function of one micro-batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from ..data import plan_micro_batches
from ..data.packing import required_pad_multiple, row_pad_multiple
from ..objective import LossInputs, objective_loss, step_counts
from .student import MicroBatch


@dataclass
class Seq:
    """One sequence of the step: a teacher demonstration or a rollout sample."""

    token_ids: list[int]
    prompt_len: int
    is_demo: bool
    advantage: float = 0.0
    adv_advantage: float = 0.0
    engine_logprobs: list[float] | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def pack_for_rank(
    seqs: list[Seq],
    max_tokens: int,
    parallel: Any,
    pad_multiple: int,
    dp_rank: int,
    dp_size: int,
    pad_id: int,
    fp8_recipe: str = "none",
) -> list[MicroBatch]:
    """This DP rank's packed micro-batches of the step's sequences, with the per-sequence loss inputs. Each
    sequence is padded for the layout, each packed row also for ``fp8_recipe``'s GEMMs (model.fp8)."""
    from ..data.microbatch import pack_rank

    layout = (parallel.tensor_model_parallel_size, parallel.context_parallel_size, parallel.sequence_parallel)
    pad = max(pad_multiple, required_pad_multiple(*layout))
    plan = plan_micro_batches(
        [len(s.token_ids) for s in seqs],
        max_tokens=max_tokens,
        dp_size=dp_size,
        pad_multiple=pad,
        micro_batch_multiple=parallel.micro_batch_multiple,
        row_multiple=row_pad_multiple(*layout, fp8_recipe=fp8_recipe),
    )
    out = []
    for p in pack_rank(plan, dp_rank, [s.token_ids for s in seqs], [s.prompt_len for s in seqs], pad_id=pad_id):
        mine = [seqs[i] for i in p.seq_ids]
        extras: dict[str, Any] = {
            "is_demo": torch.tensor([s.is_demo for s in mine], dtype=torch.bool),
            "advantages": torch.tensor([s.advantage for s in mine], dtype=torch.float32),
            "adv_advantages": torch.tensor([s.adv_advantage for s in mine], dtype=torch.float32),
        }
        for key in ("old_logprobs", "ref_logprobs"):
            if (
                mine
                and all(getattr(s, key) is not None or s.is_demo for s in mine)
                and any(getattr(s, key) is not None for s in mine)
            ):
                extras[key] = p.scatter_response(
                    [
                        getattr(s, key) if getattr(s, key) is not None else [0.0] * (len(s.token_ids) - s.prompt_len)
                        for s in mine
                    ]
                )[0]
        if any(s.engine_logprobs is not None for s in mine):
            extras["engine_logprobs"] = p.scatter_response(
                [
                    s.engine_logprobs if s.engine_logprobs is not None else [0.0] * (len(s.token_ids) - s.prompt_len)
                    for s in mine
                ]
            )[0]
        out.append(MicroBatch(p, extras))
    return out


def combine_updates(per_update: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from its optimizer updates' (ppo_epochs x minibatches of them): the mean of each
    metric over the updates, grad_norm included (what verl logs), grad_norm/max the largest norm, lr the
    last update's and skipped the number of skipped updates."""
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for m in per_update for k in m):
        values = [m[k] for m in per_update if k in m]
        out[k] = values[-1] if k == "lr" else sum(values) if k == "skipped" else sum(values) / len(values)
    if len(per_update) > 1 and "grad_norm" in out:
        out["grad_norm/max"] = max(m["grad_norm"] for m in per_update)
    return out


def set_token_temperatures(mbs: list[MicroBatch], temperature: float) -> list[MicroBatch]:
    """Each target token's temperature: the sampler's for rollout tokens (their log-probs must be those of
    the distribution they were drawn from), 1 for demonstrations (SFT trains the model's own distribution,
    not softmax(z / T))."""
    if temperature == 1.0:
        return mbs
    for mb in mbs:
        per_seq = torch.where(mb.extras["is_demo"], 1.0, float(temperature)).to(torch.float32)
        mb.temperature = mb.packed.per_token(per_seq, fill=float(temperature))
    return mbs


def global_counts(mbs: list[MicroBatch], dp_group: Any) -> Any:
    """Trained tokens / sequences of the whole optimizer step, over all micro-batches and DP ranks."""
    return step_counts(
        [
            SimpleNamespace(
                loss_mask=m.packed.loss_mask[0],
                seq_ids=m.packed.seq_index,
                is_demo=m.extras["is_demo"],
                seq_token_counts=None,
            )
            for m in mbs
        ],
        group=dp_group,
    )


def make_loss_fn(weights: Any, counts: Any, cfg: Any):
    """The objective on one micro-batch, as Student.train_step calls it."""

    def fn(mb: MicroBatch, out: torch.Tensor) -> tuple[torch.Tensor, dict]:
        lp, ent = (out[:, 0], out[:, 1]) if out.dim() == 2 else (out, None)
        e = mb.extras
        inputs = LossInputs(
            logprobs=lp,
            loss_mask=mb.packed.loss_mask[0],
            seq_ids=mb.packed.seq_index,
            is_demo=e["is_demo"],
            advantages=e["advantages"],
            adv_advantages=e["adv_advantages"],
            old_logprobs=e.get("old_logprobs"),
            ref_logprobs=e.get("ref_logprobs"),
            engine_logprobs=e.get("engine_logprobs") if cfg.tis_cap is not None else None,
            entropy=ent,
        )
        loss, metrics = objective_loss(inputs, weights, cfg, counts)
        metrics["loss/total"] = loss.detach()
        return loss, metrics

    return fn
