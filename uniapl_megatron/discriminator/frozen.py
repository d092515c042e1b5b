"""Frozen reference-conditioned discriminator (UniAPL's choice, after POLAR, arXiv 2507.05197).

A reward model that reads (prompt, teacher's reference answer, candidate) as one text and
returns a scalar: how close the candidate is to the reference. It is never trained here; the
paper keeps it frozen. Scores are computed in eval mode without gradients.
"""

from __future__ import annotations

from typing import Sequence

import torch

from uniapl_megatron.discriminator.base import (
    REFERENCE_TEMPLATE,
    DiscriminatorBase,
    DiscriminatorError,
    register_discriminator,
)
from uniapl_megatron.discriminator.config import DiscriminatorConfig
from uniapl_megatron.discriminator.hf_scorer import HFScorer


@register_discriminator("frozen")
class FrozenDiscriminator(DiscriminatorBase):
    """``score(prompts, references, candidates) -> list[float]`` with a frozen HF reward model."""

    def __init__(self, scorer: HFScorer):
        self.scorer = scorer.eval()
        self.scorer.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: DiscriminatorConfig) -> "FrozenDiscriminator":
        if cfg.kind != "frozen":
            raise DiscriminatorError(f"discriminator.kind: FrozenDiscriminator needs 'frozen', got {cfg.kind!r}")
        return cls(HFScorer.from_pretrained(cfg, cfg.template or REFERENCE_TEMPLATE, new_head_ok=False))

    @torch.no_grad()
    def score(self, prompts: Sequence[str], references: Sequence[str], candidates: Sequence[str]) -> list[float]:
        ids = self.scorer.encode(prompts, references, candidates)
        return self.scorer.logits(ids).cpu().tolist()
