"""Held-out reward: sample prompts the run never trains on through a rollout engine and score the samples with
the run's verifiable reward.

One function serves both places that measure it: the trainer (its own engine at the current weights, before
the first and after the last step) and the sweep's ``heldout`` evaluator (an engine loaded from the exported
checkpoint). With the same seed and weights both draw the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class HeldoutSamples:
    prompt_index: list[int]  # per sample: the prompt it answers
    texts: list[str]
    rewards: list[float]

    @property
    def mean(self) -> float:
        return sum(self.rewards) / max(len(self.rewards), 1)


def prompt_text(row: Any) -> str:
    """The last user message of an RL prompt row (what the reward's checkers and the discriminator read)."""
    users = [m["content"] for m in row.messages if m.get("role") == "user"]
    return users[-1] if users else ""


# Prompt tokens x samples per engine call (bounds one call's memory). Seeds follow the global prompt index, so the
# samples are those of a single call.
CALL_TOKENS = 2048


def sample_and_score(
    engine: Any,
    rows: Sequence[Any],
    fmt: Any,
    reward: Any,
    sampling: Any,
    n: int,
    seed: int,
    stop_ids: Sequence[int],
    call_tokens: int = CALL_TOKENS,
    offset: int = 0,
) -> HeldoutSamples:
    """``n`` samples of each prompt row (RLPrompt) at the sampling section's settings, scored by ``reward``.
    ``offset``: the global index of rows[0] when these rows are one engine's share of a longer list (the seeds
    follow it, so the shares draw what one call over the whole list draws)."""
    from ..rollout.base import SamplingParams

    index: list[int] = []
    texts: list[str] = []
    start = 0
    while start < len(rows):
        end, tokens = start, 0
        while end < len(rows) and (end == start or tokens + len(rows[end].prompt_ids) * n <= call_tokens):
            tokens += len(rows[end].prompt_ids) * n
            end += 1
        batch = engine.generate(
            [r.prompt_ids.tolist() for r in rows[start:end]],
            SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_new_tokens=sampling.max_new_tokens,
                stop_token_ids=tuple(stop_ids),
                seed=seed,
                prompt_index_offset=offset + start,
            ),
        )
        index += [start + x.prompt_index for x in batch.samples]
        texts += [fmt.decode(x.token_ids, skip_special_tokens=True) for x in batch.samples]
        start = end
    rewards = reward.score(
        [
            {
                "instruction_id_list": rows[i].instruction_id_list,
                "kwargs": rows[i].kwargs,
                "prompt": prompt_text(rows[i]),
            }
            for i in index
        ],
        texts,
    )
    return HeldoutSamples(index, texts, [float(r) for r in rewards])


def stop_token_ids(fmt: Any) -> tuple[int, ...]:
    """End-of-turn and end-of-text ids: where a sample ends (as the trainer's rollouts)."""
    eos = fmt.tokenizer.eos_token_id
    return tuple(sorted({fmt.eot_id, *([eos] if eos is not None else [])}))
