"""Bad lines, what happens to them, and the per-file account of a read."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger("uniapl_megatron.data")

# Why a line is bad; the keys of the per-reason counts.
NOT_UTF8 = "not_utf8"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY = "empty"
INVALID = "invalid"
TOO_LONG = "too_long"
REASONS = (NOT_UTF8, NOT_JSON, NOT_OBJECT, MISSING_FIELD, WRONG_TYPE, EMPTY, INVALID, TOO_LONG)


class DataError(ValueError):
    """Bad data the run cannot go on with; the message says where and what was expected."""


@dataclass(frozen=True)
class BadLine:
    path: str
    line: int  # 1-based
    reason: str  # one of REASONS
    detail: str  # what is wrong and what was expected

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}: {self.detail}"


@dataclass
class ReadReport:
    """What reading one file gave: usable rows, blank lines, bad lines per reason."""

    path: str
    kind: str  # "demonstrations" or "RL prompts"
    lines: int = 0
    blank: int = 0
    usable: int = 0
    bad: Counter = field(default_factory=Counter)

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def summary(self) -> str:
        text = f"{self.path}: {self.kind}: {self.lines} lines, {self.usable} usable"
        if self.blank:
            text += f", {self.blank} blank (ignored)"
        if self.bad:
            per_reason = ", ".join(f"{r}: {self.bad[r]}" for r in REASONS if self.bad[r])
            text += f", {self.num_bad} bad skipped ({per_reason})"
        return text


class BadLineSink:
    """Applies the bad-line policy: "stop" raises at once, "skip" logs the line and counts it."""

    def __init__(self, policy: str, report: ReadReport) -> None:
        self.policy = policy
        self.report = report

    def __call__(self, bad: BadLine) -> None:
        if self.policy == "stop":
            raise DataError(f"{bad}\n(set data.on_bad_line=skip to skip and count bad lines instead)")
        self.report.bad[bad.reason] += 1
        logger.warning("skipping bad line %s", bad)
