"""The contract between the trainer and whatever generates samples, and the registry of engines by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch

from ..registry import Registry
from .config import RolloutConfig, RolloutConfigError
from .weight_sync import SyncStats


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Log-probs are always those of this distribution (after temperature)."""

    n: int = 1  # samples per prompt (the GRPO group size G)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    # Sample j of prompt i is seeded as sample j of prompt prompt_index_offset + i: a request split across
    # engines (rollout servers) then draws exactly what one engine given all the prompts would.
    prompt_index_offset: int = 0


@dataclass
class Sample:
    """One completion of one prompt."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]  # sampler's log-prob of each sampled token (same length as token_ids)
    finish_reason: str  # "stop" (end/stop token) or "length"
    text: str | None = None


@dataclass
class RolloutBatch:
    samples: list[Sample] = field(default_factory=list)

    def for_prompt(self, i: int) -> list[Sample]:
        return [s for s in self.samples if s.prompt_index == i]


class EngineNeedsWeights(RuntimeError):
    """The engine was restarted (it crashed) and has no weights it can re-apply by itself: call
    update_weights again, then retry the request. The trainer does this on all ranks (trainer/loop.py)."""


class RolloutEngine(Protocol):
    """Generates samples and follows the trainer's weights. EngineBase gives the defaults of what not every
    engine has (restarts, several engines behind one client, joining a sender's weight broadcast)."""

    restarts: int
    """Crashes of the engine recovered from by restarting it, so far (rollout/engine_restarts)."""
    num_engines: int
    """Engines this object drives: 1 for an engine in this process; the servers' engines for the client of a
    disaggregated rollout."""
    last_sync: SyncStats
    """What the last weight load moved (tensors, bytes)."""
    receives_broadcast: bool
    """Whether its own workers join a sender's weight broadcast (connect, then receive_weights per sync) in a
    rollout server; False: the server process receives the broadcast and calls update_weights."""
    verifies_weights: bool
    """weight_digests() reports what the engine holds, so a refit can be checked (rollout.verify_weights)."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """n samples for each prompt (token ids in, token ids out), grouped by prompt order.

        May raise EngineNeedsWeights after a crash and restart; nothing else about the request changes."""

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]] | Callable[[], Iterable[tuple[str, torch.Tensor]]]
    ) -> None:
        """Load new weights given under Hugging Face names, then drop any cached prefixes.

        A zero-argument callable returning the iterator is kept, so a restarted engine can re-sync itself."""

    def sleep(self) -> None:
        """Release accelerator memory (weights and KV cache) for a colocated training phase."""

    def wake(self) -> None:
        """Take memory back: weights first, then the KV cache."""

    def shutdown(self) -> None:
        """Stop; leave no processes, sockets or cache folders behind."""

    def connect(
        self,
        host: str,
        port: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 600.0,
        rank_offset: int = 1,
    ) -> None:
        """receives_broadcast engines: join the sender's broadcast group (sender = rank 0 at host:port)."""

    def receive_weights(self, src: int = 0) -> None:
        """receives_broadcast engines: load one sync broadcast by rank ``src`` of the connected group."""


class EngineBase:
    """Defaults of the RolloutEngine protocol for an engine in this process. Engines subclass it."""

    restarts: int = 0
    num_engines: int = 1
    last_sync: SyncStats = SyncStats()
    receives_broadcast: bool = False
    verifies_weights: bool = False

    @classmethod
    def check_colocated(cls, config: RolloutConfig) -> None:
        """Refuse (rollout.placement.PlacementError, naming the field) a colocated layout this engine cannot run.
        Called by the trainer before any engine starts."""

    def connect(
        self,
        host: str,
        port: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 600.0,
        rank_offset: int = 1,
    ) -> None:
        """Only receives_broadcast engines join a broadcast group."""
        raise NotImplementedError(f"{type(self).__name__} does not join a weight broadcast (receives_broadcast)")

    def receive_weights(self, src: int = 0) -> None:
        """Only receives_broadcast engines receive a broadcast themselves."""
        raise NotImplementedError(f"{type(self).__name__} does not join a weight broadcast (receives_broadcast)")

    def weight_digests(self) -> dict[str, tuple[torch.Tensor, bool]] | None:
        """Only verifies_weights engines report digests of what they hold (rollout/digest.py)."""
        return None


# rollout.engine -> the engine class, built as cls(config); the engines register in their modules
ENGINES: Registry[type[EngineBase]] = Registry("rollout engine", RolloutConfigError)
register_engine = ENGINES.register


NamedTensors = Iterator[tuple[str, torch.Tensor]]
