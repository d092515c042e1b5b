"""The mixed-batch sampler: ratio, determinism, epochs, exact resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from uniapl_megatron.data import DataConfig, MixedBatchSampler


def make(seed: int = 5, **kw) -> MixedBatchSampler:
    args = dict(prompts_per_step=4, demos_per_step=2, seed=seed)
    args.update(kw)
    return MixedBatchSampler(10, 7, **args)


def draw(sampler: MixedBatchSampler, steps: int) -> list[tuple[list[int], list[int]]]:
    return [(b.prompt_indices, b.demo_indices) for b in (sampler.next_batch() for _ in range(steps))]


def test_ratio_and_epochs():
    s = make()
    batches = [s.next_batch() for _ in range(5)]  # 20 prompts = 2 epochs of 10; 10 demos = 1 3/7 epochs of 7
    assert all(len(b.prompt_indices) == 4 and len(b.demo_indices) == 2 for b in batches)
    assert [b.step for b in batches] == list(range(5))
    prompts = [i for b in batches for i in b.prompt_indices]
    # Each epoch is a permutation: every prompt once in the first 10 and once in the next 10.
    assert sorted(prompts[:10]) == sorted(prompts[10:]) == list(range(10))
    assert prompts[:10] != prompts[10:]  # a fresh shuffle per epoch
    demos = [i for b in batches for i in b.demo_indices]
    assert sorted(demos[:7]) == list(range(7)) and len(set(demos[7:])) == 3
    assert batches[-1].prompt_epochs == 2.0 and batches[-1].demo_epochs == pytest.approx(10 / 7)
    assert prompts[:10] != list(range(10))  # shuffled at all
    assert [i for b in draw(make(shuffle=False), 3) for i in b[0]] == list(range(10)) + [0, 1]


def test_deterministic_from_seed():
    assert draw(make(seed=1), 20) == draw(make(seed=1), 20)
    assert draw(make(seed=1), 20) != draw(make(seed=2), 20)
    # Over many epochs every item is drawn equally often.
    counts = Counter(i for p, _ in draw(make(seed=3), 50) for i in p)
    assert set(counts.values()) == {20}


def test_resume_continues_exactly():
    whole = draw(make(), 12)
    first = make()
    head = draw(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps (plain JSON)
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.step == 5
    assert head + draw(resumed, 7) == whole
    # A checkpoint from a different data set or seed is refused, not silently misapplied.
    with pytest.raises(ValueError, match="taken with 10 RL prompts, this run has 11"):
        MixedBatchSampler(11, 7, prompts_per_step=4, demos_per_step=2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 5, this run seed 6"):
        make(seed=6).load_state_dict(state)


def test_count_overrides_stages_and_errors():
    s = make()
    sft = s.next_batch(prompts=0, demos=3)  # an SFT stage, then RL: positions carry over
    assert sft.prompt_indices == [] and len(sft.demo_indices) == 3
    rl = s.next_batch(prompts=4, demos=0)
    ref = make()
    assert rl.prompt_indices == ref.next_batch(prompts=4, demos=0).prompt_indices
    with pytest.raises(ValueError, match="there are no demonstrations"):
        MixedBatchSampler(5, 0, prompts_per_step=2, demos_per_step=1, seed=0)
    only_rl = MixedBatchSampler(5, 0, prompts_per_step=2, demos_per_step=0, seed=0)
    assert only_rl.next_batch().demo_indices == []
    cfg = DataConfig(prompts_per_step=3, demos_per_step=1, seed=11, shuffle=False)
    b = MixedBatchSampler.from_config(cfg, 10, 7).next_batch()
    assert (b.prompt_indices, b.demo_indices) == ([0, 1, 2], [0])
