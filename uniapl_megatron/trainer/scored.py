"""The step's rollout samples as named data: what rollout_step.RolloutStep.run hands the trainer (and what the
ranks all_gather_object between them, so plain picklable dataclasses)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ScoredSample:
    """One sample of one prompt of the step, with its reward and discriminator score once scored."""

    prompt_pos: int
    """Position of its prompt in the step's prompt list."""
    sample_index: int
    """Which of the prompt's group_size samples it is (engine order)."""
    token_ids: list[int]
    """The completion's token ids."""
    logprobs: list[float]
    """The sampler's log-prob of each token of token_ids."""
    finish_reason: str
    """"stop" (a stop token ended it) or "length" (max_new_tokens did)."""
    reward: float = 0.0
    """The verifiable reward (0 until scored)."""
    score: float | None = None
    """The discriminator's score; None when the step scores without one."""

    @property
    def key(self) -> tuple[int, int]:
        """(prompt_pos, sample_index): where it sits in the step, unique within it."""
        return self.prompt_pos, self.sample_index


@dataclass
class RankShare:
    """What one rank sends the others after scoring: its scored samples and its counters."""

    samples: list[ScoredSample]
    """The samples this rank scored."""
    restarts: int
    """Its engine's restarts so far (0 on ranks that do not report an engine)."""
    gen_seconds: float
    """How long its engine's generation (with re-syncs) took."""
    held_peak_bytes: int
    """The most bytes it held at once during the last weight sync."""
    reward_stats: dict[str, float]
    """The reward's counters since the last step (reward/timeouts, ...)."""


@dataclass
class ScoredRollouts:
    """The step's scored samples in (prompt position, sample index) order, and their columns as tensors."""

    samples: list[ScoredSample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[ScoredSample]:
        return iter(self.samples)

    def prompt_positions(self) -> torch.Tensor:
        """Each sample's prompt position (its GRPO group)."""
        return torch.tensor([x.prompt_pos for x in self.samples])

    def rewards(self) -> torch.Tensor:
        """Each sample's reward, float32."""
        return torch.tensor([x.reward for x in self.samples], dtype=torch.float32)

    def scores(self) -> torch.Tensor | None:
        """Each sample's discriminator score, float32; None when the samples were scored without one."""
        if self.samples and self.samples[0].score is None:
            return None
        return torch.tensor([x.score for x in self.samples], dtype=torch.float32)
