"""The mixed-batch sampler: every step, some RL prompts (to roll out) and some demonstrations.

Each source is an endless stream of indices, epoch after epoch, each epoch a fresh permutation
drawn from (seed, source, epoch) — so the order depends on nothing but the seed, every rank draws
the same global batch, and a resumed run (load_state_dict) continues at exactly the same position.
A step that runs past the end of an epoch takes the rest of it and continues into the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from uniapl_megatron.data.config import DataConfig

_PROMPTS, _DEMOS = 0, 1  # stream ids mixed into the seed: the two shuffles are independent


class _EpochStream:
    """Indices 0..n-1, one permutation per epoch."""

    def __init__(self, n: int, seed: int, stream: int, shuffle: bool) -> None:
        self.n, self.seed, self.stream, self.shuffle = n, seed, stream, shuffle
        self.epoch = 0
        self.offset = 0  # indices of the current epoch already given out
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.stream, self.epoch]).permutation(self.n)
            else:
                self._order = np.arange(self.n)
        return self._order

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._epoch_order()
            got = order[self.offset : self.offset + k - len(out)]
            out.extend(int(i) for i in got)
            self.offset += len(got)
            if self.offset == self.n:
                self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        return out

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.offset / self.n if self.n else 0.0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int], name: str) -> None:
        if state["n"] != self.n:
            raise ValueError(
                f"sampler state: the checkpoint was taken with {state['n']} {name}, this run has "
                f"{self.n}; resuming would not continue the same data order "
                "(same files and filters needed)"
            )
        if not (0 <= state["offset"] < max(self.n, 1) and state["epoch"] >= 0):
            raise ValueError(f"sampler state for {name} is out of range: {state}")
        self.epoch, self.offset, self._order = int(state["epoch"]), int(state["offset"]), None


@dataclass
class MixedBatch:
    step: int  # 0-based step this batch is for
    prompt_indices: list[int]  # into the RL prompt dataset
    demo_indices: list[int]  # into the demonstration dataset
    prompt_epochs: float  # prompt epochs completed after this batch (fractional)
    demo_epochs: float


class MixedBatchSampler:
    """prompts_per_step RL prompts and demos_per_step demonstrations per step, deterministic from seed."""

    def __init__(
        self,
        num_prompts: int,
        num_demos: int,
        *,
        prompts_per_step: int,
        demos_per_step: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        for name, n, k in (
            ("RL prompts", num_prompts, prompts_per_step),
            ("demonstrations", num_demos, demos_per_step),
        ):
            if k < 0 or n < 0:
                raise ValueError(f"sampler: negative count for {name} (dataset {n}, per step {k})")
            if k > 0 and n == 0:
                raise ValueError(f"sampler: {k} {name} per step asked for, but there are no {name}")
        self.prompts_per_step = prompts_per_step
        self.demos_per_step = demos_per_step
        self.seed = seed
        self.step = 0
        self._prompts = _EpochStream(num_prompts, seed, _PROMPTS, shuffle)
        self._demos = _EpochStream(num_demos, seed, _DEMOS, shuffle)

    def next_batch(self, prompts: int | None = None, demos: int | None = None) -> MixedBatch:
        """The next step's indices. prompts / demos override the per-step counts (a staged preset
        switching from SFT to RL); the stream positions carry over either way."""
        n_prompts = self.prompts_per_step if prompts is None else prompts
        n_demos = self.demos_per_step if demos is None else demos
        for name, k, stream in (("prompts", n_prompts, self._prompts), ("demos", n_demos, self._demos)):
            if k < 0 or (k > 0 and stream.n == 0):
                raise ValueError(f"sampler: cannot draw {k} {name} from a dataset of {stream.n}")
        batch = MixedBatch(
            step=self.step,
            prompt_indices=self._prompts.take(n_prompts),
            demo_indices=self._demos.take(n_demos),
            prompt_epochs=self._prompts.epochs_done,
            demo_epochs=self._demos.epochs_done,
        )
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "step": self.step,
            "prompts": self._prompts.state_dict(),
            "demos": self._demos.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"sampler state: the checkpoint used seed {state['seed']}, this run seed {self.seed}; "
                "resuming would not continue the same data order"
            )
        # Check both streams before changing either.
        prompts = _EpochStream(self._prompts.n, self.seed, _PROMPTS, self._prompts.shuffle)
        demos = _EpochStream(self._demos.n, self.seed, _DEMOS, self._demos.shuffle)
        prompts.load_state_dict(state["prompts"], "RL prompts")
        demos.load_state_dict(state["demos"], "demonstrations")
        self._prompts, self._demos, self.step = prompts, demos, int(state["step"])

    @classmethod
    def from_config(cls, cfg: DataConfig, num_prompts: int, num_demos: int) -> "MixedBatchSampler":
        return cls(
            num_prompts,
            num_demos,
            prompts_per_step=cfg.prompts_per_step,
            demos_per_step=cfg.demos_per_step,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
        )
