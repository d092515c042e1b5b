"""Reward checks with a per-sample time limit (rewards/pool.py), by injecting checks that never finish."""

from __future__ import annotations

import logging
import random
import time

import _stuck_reward  # noqa: F401 - registers stuck_ifeval
import psutil
import pytest

from uniapl_megatron.eval.constructed import constructed_responses
from uniapl_megatron.eval.ifeval_data import load_ifeval_prompts
from uniapl_megatron.rewards import PromptRowError, build_reward

LIMIT = 5.0


@pytest.fixture(scope="module")
def batch() -> tuple[list[dict], list[str], list[float]]:
    """A GRPO-sized step: 8 IFEval prompts x 2 responses, and their scores in this process (no pool)."""
    rng = random.Random(0)
    rows, responses = [], []
    for row in load_ifeval_prompts()[:8]:
        for resp in constructed_responses(row, rng)[:2]:
            rows.append(row)
            responses.append(resp)
    return rows, responses, build_reward("ifeval", timeout_s=0).score(rows, responses)


@pytest.mark.parametrize("how", ["sleep", "regex", "exit"])
def test_a_stuck_check_costs_its_sample_a_zero_and_the_step_goes_on(batch, how, caplog):
    rows, responses, want = batch
    reward = build_reward("stuck_ifeval", {"how": how}, timeout_s=LIMIT, workers=2)
    try:
        assert reward.score(rows, responses) == want  # warm-up; nothing stuck: same scores as in-process
        assert reward.take_stats() == {"reward/timeouts": 0.0, "reward/worker_crashes": 0.0}
        stuck = list(responses)
        stuck[5] += " STUCK"
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="uniapl_megatron.rewards.pool"):
            got = reward.score(rows, stuck)
        took = time.monotonic() - t0
        assert got == want[:5] + [0.0] + want[6:]
        assert took < LIMIT + 8, f"a stuck check held the step for {took:.1f} s (limit {LIMIT} s)"
        key = "reward/timeouts" if how != "exit" else "reward/worker_crashes"
        assert reward.take_stats()[key] == 1.0
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "sample 5" in logged and "STUCK" in logged and rows[5]["prompt"][:50] in logged, logged
        # The next step: the pool replaced the killed worker and scores as before.
        assert reward.score(rows, responses) == want
        assert reward.take_stats()["reward/timeouts"] == 0.0
        print(f"{how}: the step with the stuck sample took {took:.1f} s (limit {LIMIT:g} s)")
    finally:
        reward.close()


def _workers() -> set[int]:
    """Processes forked by multiprocessing's forkserver for this process (the forkserver itself stays up)."""
    servers = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
    return {c.pid for s in servers for c in s.children() if c.status() != psutil.STATUS_ZOMBIE}


def test_bad_rows_still_raise_through_the_pool(batch):
    rows, responses, want = batch
    before = _workers()
    reward = build_reward("ifeval", timeout_s=LIMIT)
    try:
        assert reward.score(rows, responses) == want
        assert len(_workers() - before) == 2  # the pool's workers
        with pytest.raises(PromptRowError, match="unknown instruction id"):
            reward.score([{**rows[0], "instruction_id_list": ["nope:x"], "kwargs": [{}]}], ["text"])
        with pytest.raises(PromptRowError, match="1 prompt rows but 2 responses"):
            reward.score(rows[:1], responses[:2])
    finally:
        reward.close()
    assert _workers() <= before, "the pool's workers outlived close()"


def test_an_engine_never_takes_the_pool_for_its_own(batch):
    """A vLLM engine ends the processes it started at a restart (the children that appeared while it started).
    The pool's forkserver and workers, started by a background thread that may overlap an engine's start,
    are multiprocessing's, never the engine's: ending them broke the pool of a DP2 run after its killed engine
    core was restarted."""
    from multiprocessing import forkserver

    from uniapl_megatron.rollout.vllm_host import current_children

    rows, responses, _ = batch
    reward = build_reward("ifeval", timeout_s=LIMIT, workers=2)
    try:
        reward.score(rows[:4], responses[:4])  # the pool is up
        server = psutil.Process(forkserver._forkserver._forkserver_pid)
        pool = {server.pid, *(p.pid for p in server.children(recursive=True))}
        assert len(pool) >= 3, pool  # the forkserver and two workers
        assert not pool & current_children(), pool & current_children()
    finally:
        reward.close()
