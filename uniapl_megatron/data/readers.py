"""Streaming JSONL readers for demonstrations and RL prompts (schemas in schema.py).

A file is read line by line in binary and tokenized in chunks (one batch call per chunk), so a large
file is never held as text; a row keeps its token ids (int32 arrays) and, for RL prompts, the parsed
messages and constraints the rewards and the discriminator need. Bad lines are reported in file
order with file:line and the reason, and stop the run or are skipped and counted (DataConfig.on_bad_line).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Collection, Generic, Iterable, TypeVar

import numpy as np

from uniapl_megatron.data.chat import ChatFormatter, Messages
from uniapl_megatron.data.config import DataConfig
from uniapl_megatron.data.report import INVALID, TOO_LONG, BadLine, BadLineSink, DataError, ReadReport
from uniapl_megatron.data.schema import LineProblem, ParsedDemo, ParsedPrompt, decode_line, parse_demo, parse_prompt

logger = logging.getLogger("uniapl_megatron.data")


@dataclass
class Demo:
    """One teacher demonstration, tokenized."""

    prompt_ids: np.ndarray  # int32, chat template with the generation prompt
    response_ids: np.ndarray  # int32, the teacher's answer + end-of-turn; the only trained tokens
    path: str
    line: int

    @property
    def token_ids(self) -> np.ndarray:
        return np.concatenate([self.prompt_ids, self.response_ids])

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class RLPrompt:
    """One RL prompt: what the rollout engine gets, and what its samples are checked against."""

    prompt_ids: np.ndarray  # int32, chat template with the generation prompt
    messages: Messages  # the prompt as chat messages (for the discriminator, logs)
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]  # one per instruction id
    teacher_response: str | None  # the discriminator's reference answer
    key: int | str | None
    path: str
    line: int

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"


RowT = TypeVar("RowT")


@dataclass
class Dataset(Generic[RowT]):
    rows: list[RowT]
    reports: list[ReadReport]  # one per file, in the order read

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> RowT:
        return self.rows[i]


def _read_file(
    path: str,
    kind: str,
    policy: str,
    chunk_lines: int,
    parse: Callable[[dict[str, Any]], Any],
    finish: Callable[[str, list[tuple[int, Any]], Callable[[BadLine], None]], list],
) -> tuple[list, ReadReport]:
    """Lines -> parsed records (parse) -> chunks tokenized into rows (finish), bad lines to the sink.

    A chunk is finished before any later bad line is reported, so reports come in file order and
    "stop" stops at the first bad line of the file.
    """
    report = ReadReport(path=path, kind=kind)
    sink = BadLineSink(policy, report)
    rows: list = []
    pending: list[tuple[int, Any]] = []

    def flush() -> None:
        if pending:
            rows.extend(finish(path, pending, sink))
            pending.clear()

    if not os.path.isfile(path):
        raise DataError(f"{kind} file not found: {path}")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            report.lines = line_no
            if not raw.strip():
                report.blank += 1
                continue
            try:
                pending.append((line_no, parse(decode_line(raw))))
            except LineProblem as p:
                flush()
                sink(BadLine(path, line_no, p.reason, p.detail))
                continue
            if len(pending) >= chunk_lines:
                flush()
    flush()
    report.usable = len(rows)
    logger.info("%s", report.summary())
    if not rows:
        raise DataError(f"no usable {kind} in {path}: {report.summary()}")
    return rows, report


def _too_long(path: str, line: int, what: str, n: int, limit: int, field: str) -> BadLine:
    return BadLine(
        path, line, TOO_LONG, f"{what} is {n} tokens after the chat template, more than data.{field}={limit}"
    )


def read_demos(paths: Iterable[str], formatter: ChatFormatter, cfg: DataConfig) -> Dataset[Demo]:
    """All demonstrations of the files, tokenized and checked."""

    def finish(path: str, chunk: list[tuple[int, ParsedDemo]], sink: Callable[[BadLine], None]) -> list[Demo]:
        texts: list[str | DataError] = []
        for _, d in chunk:
            try:
                texts.append(formatter.answer_text(d.messages, d.response))
            except DataError as e:
                texts.append(e)
        good = [i for i, t in enumerate(texts) if isinstance(t, str)]
        prompts = dict(zip(good, formatter.encode_prompts([chunk[i][1].messages for i in good])))
        responses = dict(zip(good, formatter.encode_answer_texts([texts[i] for i in good])))
        out = []
        for i, (line, _) in enumerate(chunk):  # in file order, bad lines included
            if i not in prompts:
                sink(BadLine(path, line, INVALID, str(texts[i])))
                continue
            p, r = prompts[i], responses[i]
            if len(p) > cfg.max_prompt_tokens:
                sink(_too_long(path, line, "the prompt", len(p), cfg.max_prompt_tokens, "max_prompt_tokens"))
            elif len(p) + len(r) > cfg.max_demo_tokens:
                sink(
                    _too_long(
                        path,
                        line,
                        "prompt + response + end-of-turn",
                        len(p) + len(r),
                        cfg.max_demo_tokens,
                        "max_demo_tokens",
                    )
                )
            else:
                out.append(Demo(prompt_ids=p, response_ids=r, path=path, line=line))
        return out

    rows: list[Demo] = []
    reports = []
    for path in paths:
        got, report = _read_file(path, "demonstrations", cfg.on_bad_line, cfg.read_chunk_lines, parse_demo, finish)
        rows.extend(got)
        reports.append(report)
    if not reports:
        raise DataError("no demonstration files given (data.demo_paths is empty)")
    return Dataset(rows, reports)


def read_prompts(
    paths: Iterable[str],
    formatter: ChatFormatter,
    cfg: DataConfig,
    known_instruction_ids: Collection[str] | None = None,
) -> Dataset[RLPrompt]:
    """All RL prompts of the files, tokenized and checked.

    known_instruction_ids: the reward registry's names; an id outside it is a bad line. None: not checked.
    """

    def parse(obj: dict[str, Any]) -> ParsedPrompt:
        return parse_prompt(
            obj, require_teacher_response=cfg.require_teacher_response, known_instruction_ids=known_instruction_ids
        )

    def finish(path: str, chunk: list[tuple[int, ParsedPrompt]], sink: Callable[[BadLine], None]) -> list[RLPrompt]:
        prompts = formatter.encode_prompts([d.messages for _, d in chunk])
        out = []
        for (line, d), p in zip(chunk, prompts):
            if len(p) > cfg.max_prompt_tokens:
                sink(_too_long(path, line, "the prompt", len(p), cfg.max_prompt_tokens, "max_prompt_tokens"))
                continue
            out.append(
                RLPrompt(
                    prompt_ids=p,
                    messages=d.messages,
                    instruction_id_list=d.instruction_id_list,
                    kwargs=d.kwargs,
                    teacher_response=d.teacher_response,
                    key=d.key,
                    path=path,
                    line=line,
                )
            )
        return out

    rows: list[RLPrompt] = []
    reports = []
    for path in paths:
        got, report = _read_file(path, "RL prompts", cfg.on_bad_line, cfg.read_chunk_lines, parse, finish)
        rows.extend(got)
        reports.append(report)
    if not reports:
        raise DataError("no RL prompt files given (data.prompt_paths is empty)")
    return Dataset(rows, reports)
