"""The discriminator contract the trainer talks to, its registry, and the input template the kinds share."""

from __future__ import annotations

import string
from typing import Any, Protocol, Sequence, runtime_checkable

from uniapl_megatron.registry import Registry


class DiscriminatorError(ValueError):
    """A bad discriminator setting, checkpoint folder or input; the message says which and why."""


@runtime_checkable
class Discriminator(Protocol):
    """Scores each candidate answer against the teacher's reference answer for the same prompt.

    Higher means "more like the teacher". Scores are deterministic for the same inputs and
    weights, and do not depend on how the inputs are batched. A trainable one (``trainable``) also
    learns during the run and has state to checkpoint; the others keep DiscriminatorBase's no-ops.
    """

    trainable: bool
    """Whether update() trains it and state_dict() holds something to checkpoint."""

    def score(self, prompts: Sequence[str], references: Sequence[str], candidates: Sequence[str]) -> list[float]:
        """One float per (prompt, reference, candidate) triple, in input order."""

    def update(
        self,
        step: int,
        prompts: Sequence[str],
        references: Sequence[str],
        candidates: Sequence[str],
        owned: Sequence[bool] | None = None,
        group: object = None,
    ) -> dict[str, float]:
        """Train on one step's data when ``step`` falls on the update period; return metrics. ``owned``: which
        candidates this rank holds (the others are ""); ``group``: where the gradients are summed."""

    def state_dict(self) -> dict:
        """Everything needed to resume: weights, optimizer state."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""


@runtime_checkable
class TrainableDiscriminator(Discriminator, Protocol):
    """A discriminator that learns during the run (teacher answers real, rollouts fake): ``trainable`` is True."""


class DiscriminatorBase:
    """A frozen discriminator's defaults: nothing to train, nothing to save. Discriminators subclass it."""

    trainable: bool = False

    def update(
        self,
        step: int,
        prompts: Sequence[str],
        references: Sequence[str],
        candidates: Sequence[str],
        owned: Sequence[bool] | None = None,
        group: object = None,
    ) -> dict[str, float]:
        """Frozen: no training, no metrics."""
        return {}

    def state_dict(self) -> dict:
        """Frozen: its weights are the checkpoint folder's; nothing to save."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Frozen: nothing to restore."""


# discriminator.kind -> a class with from_config(DiscriminatorConfig); the kinds register in their modules
DISCRIMINATORS: Registry[Any] = Registry("discriminator kind", DiscriminatorError)
register_discriminator = DISCRIMINATORS.register


# Reference-conditioned (frozen, POLAR-style): the model sees the teacher's answer next to the
# candidate. A POLAR checkpoint needs its own training format here instead.
REFERENCE_TEMPLATE = "{prompt}\n\n[Reference answer]\n{reference}\n\n[Candidate answer]\n{candidate}"
# Unconditioned (online, GAIL-style): the teacher's answer is itself the "real" example, so
# showing it as a reference would teach the model to spot copies instead of quality.
CANDIDATE_TEMPLATE = "{prompt}\n\n[Answer]\n{candidate}"
_FIELDS = ("prompt", "reference", "candidate")


def template_fields(template: str, where: str = "discriminator.template") -> set[str]:
    """The template's placeholders, checked: {prompt}, {reference}, {candidate} only, {candidate} required."""
    if not isinstance(template, str):
        raise DiscriminatorError(f"{where}: expected a string, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DiscriminatorError(f"{where}: not a valid format string ({exc}); write literal braces doubled") from exc
    found = set()
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name not in _FIELDS or spec or conv:
            raise DiscriminatorError(
                f"{where}: unknown placeholder {{{name}}}; allowed are {{prompt}}, {{reference}}, {{candidate}}"
            )
        found.add(name)
    if "candidate" not in found:
        raise DiscriminatorError(f"{where}: must contain {{candidate}}")
    return found


def check_triples(prompts: Sequence[str], references: Sequence[str], candidates: Sequence[str]) -> None:
    """Equal lengths, strings only."""
    n = len(candidates)
    if len(prompts) != n or len(references) != n:
        raise DiscriminatorError(
            f"score: prompts, references and candidates must have the same length, "
            f"got {len(prompts)}, {len(references)}, {n}"
        )
    for name, seq in (("prompts", prompts), ("references", references), ("candidates", candidates)):
        for i, x in enumerate(seq):
            if not isinstance(x, str):
                raise DiscriminatorError(f"score: {name}[{i}] must be a string, got {type(x).__name__}")
