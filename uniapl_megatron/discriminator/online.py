"""Online discriminator: trained during the run, teacher answers real, rollouts fake (GAIL-style).

Goes beyond the paper (whose discriminator is frozen): the discriminator keeps up with the
policy, so its scores stay informative as rollouts get closer to the teacher.

It sees (prompt, answer) only. Its real examples *are* the teacher's references, so showing
the reference as well would let it learn "candidate == reference" instead of what makes an
answer teacher-like; ``score`` therefore ignores ``references``.

Training: binary cross-entropy on the logit, each class weighted to half of the loss (one
reference per prompt against G rollouts), AdamW of its own, every ``update_period`` policy
steps. Shuffling is seeded by (seed, step), so a resumed run replays the same updates. In a
data-parallel run, call ``update`` with the same (gathered) data on every rank, or on one
rank and broadcast the scores, so that the copies never drift apart.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from uniapl_megatron.discriminator.base import (
    CANDIDATE_TEMPLATE,
    DiscriminatorBase,
    DiscriminatorError,
    check_triples,
    register_discriminator,
)
from uniapl_megatron.discriminator.config import DiscriminatorConfig
from uniapl_megatron.discriminator.hf_scorer import HFScorer

_STATE_KEYS = {"model", "optimizer", "updates"}


@register_discriminator("online")
class OnlineDiscriminator(DiscriminatorBase):
    """The Discriminator protocol, trainable: ``update`` trains it, ``state_dict`` holds weights and optimizer."""

    trainable = True

    def __init__(self, scorer: HFScorer, cfg: DiscriminatorConfig):
        if "{reference}" in scorer.template:
            raise DiscriminatorError("discriminator.template: the online kind must not use {reference}")
        self.scorer = scorer.eval()
        self.cfg = cfg
        params = [p for p in scorer.parameters() if p.requires_grad]
        try:  # the fused kernel is ~10x faster on CPU for a large embedding table
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.updates = 0  # training updates done so far (saved in checkpoints)

    @classmethod
    def from_config(cls, cfg: DiscriminatorConfig) -> "OnlineDiscriminator":
        if cfg.kind != "online":
            raise DiscriminatorError(f"discriminator.kind: OnlineDiscriminator needs 'online', got {cfg.kind!r}")
        return cls(HFScorer.from_pretrained(cfg, cfg.template or CANDIDATE_TEMPLATE, new_head_ok=True), cfg)

    def _transform(self, z: torch.Tensor) -> torch.Tensor:
        if self.cfg.score_transform == "prob":
            return torch.sigmoid(z)
        if self.cfg.score_transform == "log_prob":
            return F.logsigmoid(z)
        return z

    @torch.no_grad()
    def score(self, prompts: Sequence[str], references: Sequence[str], candidates: Sequence[str]) -> list[float]:
        self.scorer.eval()
        ids = self.scorer.encode(prompts, references, candidates)
        return self._transform(self.scorer.logits(ids)).cpu().tolist()

    def update(
        self,
        step: int,
        prompts: Sequence[str],
        references: Sequence[str],
        candidates: Sequence[str],
        owned: Sequence[bool] | None = None,
        group: object = None,
    ) -> dict[str, float]:
        """One round of training on a step's data, when ``step % update_period == 0``.

        Real examples: each distinct non-empty (prompt, reference) pair. Fake: every (prompt,
        candidate). Metrics are measured on the training logits before each batch's update.

        Data-parallel (``group``, a torch.distributed group of ranks holding equal copies): every rank passes
        the same prompts and references, its own candidates where ``owned`` is true (others may be empty
        strings, never read). Each rank computes the gradient of its rows of every batch (its candidates;
        real example k on rank k mod world); the summed gradient is that of the whole batch, so all copies
        take the same update a single process would.
        """
        check_triples(prompts, references, candidates)
        if step % self.cfg.update_period != 0:
            return {"disc/updated": 0.0}
        rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
        owned = [True] * len(candidates) if owned is None else list(owned)
        real = list(dict.fromkeys((p, r) for p, r in zip(prompts, references) if r))
        if not real or not candidates:
            raise DiscriminatorError("update: needs at least one non-empty reference and one candidate")
        n_real, n = len(real), len(real) + len(candidates)
        mine = [k % world == rank for k in range(n_real)] + owned
        texts = [(p, "", r) for p, r in real] + list(zip(prompts, references, candidates))
        ids = dict(
            zip(
                [i for i in range(n) if mine[i]],
                self.scorer.encode(*map(list, zip(*[texts[i] for i in range(n) if mine[i]]))) if any(mine) else [],
            )
        )
        labels = torch.tensor([1.0] * n_real + [0.0] * len(candidates), device=self.scorer.device)
        # Each class carries half of the loss, whatever the real:fake ratio.
        class_w = torch.where(labels > 0, n / (2.0 * n_real), n / (2.0 * len(candidates)))

        sums, batches = self._train_epochs(step, mine, ids, labels, class_w, group)
        self.updates += 1
        return {
            "disc/updated": 1.0,
            "disc/loss": float(sums[0]) / batches,
            "disc/acc_real": float(sums[1]) / n_real,
            "disc/acc_fake": float(sums[2]) / len(candidates),
        }

    def _train_epochs(
        self,
        step: int,
        mine: list[bool],
        ids: dict[int, Any],
        labels: torch.Tensor,
        class_w: torch.Tensor,
        group: object,
    ) -> tuple[torch.Tensor, int]:
        """update_epochs passes over the examples in batches shuffled from (seed, step). Returns the summed
        (loss, real right, fake right), the right counts from the first epoch only, and the batch count."""
        n = len(mine)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        sums = torch.zeros(3, dtype=torch.float64)  # loss, real right, fake right
        batches = 0
        self.scorer.train()
        for epoch in range(self.cfg.update_epochs):
            order = torch.randperm(n, generator=gen).tolist()
            for start in range(0, n, self.cfg.train_batch_size):
                idx = order[start : start + self.cfg.train_batch_size]
                part = self._train_batch(idx, [i for i in idx if mine[i]], ids, labels, class_w, group)
                sums[0] += part[0]
                if epoch == 0:
                    sums[1:] += part[1:]
                batches += 1
        self.scorer.eval()
        return sums, batches

    def _train_batch(
        self,
        idx: list[int],
        rows: list[int],
        ids: dict[int, Any],
        labels: torch.Tensor,
        class_w: torch.Tensor,
        group: object,
    ) -> torch.Tensor:
        """One optimizer step on the batch `idx`, of which this rank computes `rows`. Returns the batch's
        (loss, real right, fake right), summed over the group."""
        self.optimizer.zero_grad(set_to_none=True)
        part = torch.zeros(3, dtype=torch.float64)
        if rows:
            z = self.scorer.logits([ids[i] for i in rows])
            y, w = labels[rows], class_w[rows]
            # This rank's share of the batch mean: the shares add up to it over the group.
            loss = (F.binary_cross_entropy_with_logits(z, y, reduction="none") * w).sum() / len(idx)
            loss.backward()
            right = ((z.detach() > 0).float() == y).float()
            part = torch.tensor(
                [float(loss.detach()), float((right * y).sum()), float((right * (1 - y)).sum())], dtype=torch.float64
            )
        if group is not None:
            self._sum_grads(group)
            dist.all_reduce(part, group=group)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.scorer.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        return part

    def _sum_grads(self, group: object) -> None:
        """Sum the trainable parameters' gradients over the group in one flat all-reduce (a missing grad is 0)."""
        params = [p for p in self.scorer.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def state_dict(self) -> dict:
        return {"model": self.scorer.state_dict(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != _STATE_KEYS:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise DiscriminatorError(f"online discriminator state: expected keys {sorted(_STATE_KEYS)}, got {got}")
        try:
            self.scorer.load_state_dict(state["model"], strict=True)
            # A copy: torch would otherwise share moment tensors with the caller's dict (and with the
            # live discriminator it came from, when handed over in memory).
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DiscriminatorError(f"online discriminator state does not fit this model: {exc}") from exc
        self.updates = int(state["updates"])
