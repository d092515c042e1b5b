"""The step's sequences as the student trains on them: demos and scored rollouts (Seq), packed into this data-
parallel rank's micro-batches, each with its loss inputs (objective.LossInputs) and per-token temperatures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import plan_micro_batches
from ..data.packing import PackedBatch, required_pad_multiple, row_pad_multiple
from ..objective import LossInputs
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
        out.append(MicroBatch(p, _loss_inputs(p, mine)))
    return out


def _loss_inputs(p: PackedBatch, mine: list[Seq]) -> LossInputs:
    """The loss inputs of one packed row holding the sequences ``mine`` (in row order). A per-token input is
    given where every rollout of the row has it (demos get zeros there, which the loss never reads)."""

    def per_token(key: str, need_all: bool) -> torch.Tensor | None:
        have = [getattr(s, key) is not None for s in mine]
        if not any(have) or need_all and not all(h or s.is_demo for h, s in zip(have, mine)):
            return None
        values = [
            getattr(s, key) if getattr(s, key) is not None else [0.0] * (len(s.token_ids) - s.prompt_len) for s in mine
        ]
        return p.scatter_response(values)[0]

    return LossInputs(
        loss_mask=p.loss_mask[0],
        seq_ids=p.seq_index,
        is_demo=torch.tensor([s.is_demo for s in mine], dtype=torch.bool),
        advantages=torch.tensor([s.advantage for s in mine], dtype=torch.float32),
        adv_advantages=torch.tensor([s.adv_advantage for s in mine], dtype=torch.float32),
        old_logprobs=per_token("old_logprobs", need_all=True),
        ref_logprobs=per_token("ref_logprobs", need_all=True),
        engine_logprobs=per_token("engine_logprobs", need_all=False),
    )


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
        per_seq = torch.where(mb.inputs.is_demo, 1.0, float(temperature)).to(torch.float32)
        mb.temperature = mb.packed.per_token(per_seq, fill=float(temperature))
    return mbs
