"""The Reward contract the trainer talks to, and a registry to build one by name from a config."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from uniapl_megatron.registry import Registry


class RewardConfigError(ValueError):
    """A bad reward name or option; the message names it and says what is expected."""


class PromptRowError(ValueError):
    """A prompt row the reward cannot score; the message names the row and the field."""


@runtime_checkable
class Reward(Protocol):
    """Scores responses to prompts.

    A prompt row is a dict like a row of IFEval's data: ``instruction_id_list`` (list of
    instruction ids), ``kwargs`` (one dict of checker arguments per instruction) and,
    optionally, ``prompt`` (the text) and ``key``. Extra fields are ignored.
    """

    name: str

    def score(self, prompts: list[dict], responses: list[str]) -> list[float]:
        """One float per (prompt, response) pair; ``prompts[i]`` goes with ``responses[i]``."""

    def take_stats(self) -> dict[str, float]:
        """Counters since the last call, as metrics (``reward/timeouts``, ...); {} when it keeps none."""

    def close(self) -> None:
        """Release what scoring holds (worker processes); nothing for an in-process reward."""


class RewardBase:
    """What a reward does by default: no counters, nothing to release. Rewards subclass it."""

    name: str = ""

    def take_stats(self) -> dict[str, float]:
        """No counters."""
        return {}

    def close(self) -> None:
        """Nothing to release."""


# name -> (config dataclass, factory taking an instance of it)
REWARDS: Registry[tuple[type, Callable[[Any], Reward]]] = Registry("reward", RewardConfigError)


def register_reward(name: str, config_cls: type) -> Callable[[Callable[[Any], Reward]], Callable[[Any], Reward]]:
    """Decorator: make ``factory(config)`` buildable as ``build_reward(name, options)``."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"reward {name!r}: config class must be a dataclass")

    def deco(factory: Callable[[Any], Reward]) -> Callable[[Any], Reward]:
        REWARDS.add(name, (config_cls, factory))
        return factory

    return deco


def available_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return REWARDS.names()


def build_reward(
    name: str, options: Mapping[str, Any] | None = None, timeout_s: float = 10.0, workers: int = 2
) -> Reward:
    """Build the reward registered as ``name``, with ``options`` as its config fields.

    With ``timeout_s`` > 0 (the default) every sample is scored in a warm pool of ``workers`` processes
    with that time limit (rewards/pool.py); 0 scores in this process, without a limit."""
    config_cls, factory = REWARDS.get(name)
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise RewardConfigError(
            f"reward {name!r}: unknown option(s) {', '.join(unknown)}; expected some of: {', '.join(sorted(fields))}"
        )
    config = config_cls(**options)
    if timeout_s > 0:
        from uniapl_megatron.rewards.pool import TimedReward

        return TimedReward(name, factory, config, timeout_s, workers)
    return factory(config)
