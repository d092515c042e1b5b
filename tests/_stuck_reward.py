"""A reward for fault injection: IFEval's, except that a response containing ``trigger`` never finishes its
check: it sleeps forever, or backtracks forever in a regex (C code that holds the GIL and ignores SIGTERM's
Python handler), or its process dies. Registered as ``stuck_ifeval`` on import."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from uniapl_megatron.rewards import IFEvalReward, RewardBase, register_reward


@dataclass
class StuckConfig:
    trigger: str = "STUCK"
    how: str = "sleep"  # or "regex", or "exit" (the worker process dies)


class StuckReward(RewardBase):
    name = "stuck_ifeval"

    def __init__(self, config: StuckConfig) -> None:
        self.config, self.inner = config, IFEvalReward()

    def score(self, prompts: list[dict], responses: list[str]) -> list[float]:
        for r in responses:
            if self.config.trigger in r:
                if self.config.how == "sleep":
                    time.sleep(10**6)
                if self.config.how == "exit":
                    os._exit(3)
                re.match(r"(a|aa)+$", "a" * 200 + "b")  # exponential backtracking
        return self.inner.score(prompts, responses)


@register_reward("stuck_ifeval", StuckConfig)
def make_stuck(config: StuckConfig) -> StuckReward:
    return StuckReward(config)
