"""The JSONL schemas, checked one line at a time.

One JSON object per line. Blank lines are ignored (and counted). Fields not named here are ignored,
so one file can serve as both demonstrations and RL prompts.

The prompt, in both files: exactly one of
  "prompt":   a non-empty string (becomes one user message), or
  "messages": a list of {"role": "system" | "user" | "assistant", "content": str}, ending with a
              non-empty user message (earlier assistant turns are context, never trained on).

Demonstrations:
  "teacher_response": the teacher's answer, a non-empty string (trained on, plus the end-of-turn
                      token). The answer is read only from this field: a line with "response" or
                      "completion" instead is a bad line whose message says so.

RL prompts:
  "instruction_id_list": non-empty list of non-empty strings, the constraints to verify
                         (IFEval names such as "length_constraints:number_words").
  "kwargs":              list of objects (or null, read as {}), one per instruction id, the
                         checker's arguments.
  "teacher_response":    optional non-empty string or null; the discriminator's reference.
                         Required when DataConfig.require_teacher_response is set.
  "key":                 optional int or string identifying the prompt (IFEval's "key").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Collection

from uniapl_megatron.data.report import EMPTY, INVALID, MISSING_FIELD, NOT_JSON, NOT_OBJECT, NOT_UTF8, WRONG_TYPE

ROLES = ("system", "user", "assistant")
# Fields people commonly use for the answer; named in the message when "teacher_response" is missing.
_OTHER_ANSWER_FIELDS = ("response", "completion", "answer", "output", "chosen")


class LineProblem(Exception):
    """Why one line cannot be used: a reason key (report.REASONS) and a sentence."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class ParsedDemo:
    messages: list[dict[str, str]]
    response: str


@dataclass
class ParsedPrompt:
    messages: list[dict[str, str]]
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]
    teacher_response: str | None
    key: int | str | None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def decode_line(raw: bytes) -> dict[str, Any]:
    """bytes of one line -> the JSON object on it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineProblem(NOT_UTF8, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LineProblem(NOT_JSON, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise LineProblem(NOT_OBJECT, f"expected a JSON object per line, got a JSON {_type_name(obj)}")
    return obj


def _string_field(obj: dict[str, Any], name: str) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise LineProblem(WRONG_TYPE, f"field '{name}' must be a string, got {_type_name(value)}")
    if not value.strip():
        raise LineProblem(EMPTY, f"field '{name}' is empty")
    return value


def parse_messages(obj: dict[str, Any]) -> list[dict[str, str]]:
    """The prompt of a line as chat messages (from "prompt" or "messages")."""
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt and has_messages:
        raise LineProblem(INVALID, "give exactly one of 'prompt' and 'messages', not both")
    if not (has_prompt or has_messages):
        raise LineProblem(MISSING_FIELD, "missing field 'prompt' (a string) or 'messages' (a list of chat messages)")
    if has_prompt:
        return [{"role": "user", "content": _string_field(obj, "prompt")}]
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise LineProblem(WRONG_TYPE, f"field 'messages' must be a list of messages, got {_type_name(messages)}")
    if not messages:
        raise LineProblem(EMPTY, "field 'messages' is an empty list")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise LineProblem(WRONG_TYPE, f"{where} must be an object with 'role' and 'content', got {_type_name(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise LineProblem(MISSING_FIELD, f"{where} has no '{key}'")
            if not isinstance(m[key], str):
                raise LineProblem(WRONG_TYPE, f"{where}.{key} must be a string, got {_type_name(m[key])}")
        if m["role"] not in ROLES:
            raise LineProblem(INVALID, f"{where}.role is {m['role']!r}; expected one of {', '.join(ROLES)}")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "user":
        raise LineProblem(
            INVALID, f"the last message must be the user's (the prompt to answer), got role {clean[-1]['role']!r}"
        )
    if not clean[-1]["content"].strip():
        raise LineProblem(EMPTY, f"messages[{len(clean) - 1}].content (the user's prompt) is empty")
    return clean


def parse_demo(obj: dict[str, Any]) -> ParsedDemo:
    messages = parse_messages(obj)
    if "teacher_response" not in obj:
        found = [k for k in _OTHER_ANSWER_FIELDS if k in obj]
        hint = (
            f" (found {', '.join(repr(k) for k in found)}; the answer is read only from 'teacher_response')"
            if found
            else ""
        )
        raise LineProblem(MISSING_FIELD, f"missing field 'teacher_response' (the teacher's answer){hint}")
    return ParsedDemo(messages=messages, response=_string_field(obj, "teacher_response"))


def parse_prompt(
    obj: dict[str, Any], *, require_teacher_response: bool, known_instruction_ids: Collection[str] | None = None
) -> ParsedPrompt:
    messages = parse_messages(obj)
    for name in ("instruction_id_list", "kwargs"):
        if name not in obj:
            raise LineProblem(MISSING_FIELD, f"missing field '{name}'")
    ids, kwargs = obj["instruction_id_list"], obj["kwargs"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise LineProblem(
            WRONG_TYPE,
            f"field 'instruction_id_list' must be a list of strings, got {_type_name(ids)}"
            + ("" if not isinstance(ids, list) else " with non-string items"),
        )
    if not ids:
        raise LineProblem(EMPTY, "field 'instruction_id_list' is empty: nothing to verify the rollouts against")
    if not all(i.strip() for i in ids):
        raise LineProblem(EMPTY, "field 'instruction_id_list' holds an empty id")
    if not isinstance(kwargs, list):
        raise LineProblem(WRONG_TYPE, f"field 'kwargs' must be a list of objects, got {_type_name(kwargs)}")
    kwargs = [{} if k is None else k for k in kwargs]
    if not all(isinstance(k, dict) for k in kwargs):
        bad = next(k for k in kwargs if not isinstance(k, dict))
        raise LineProblem(WRONG_TYPE, f"field 'kwargs' must hold objects, found a {_type_name(bad)}")
    if len(kwargs) != len(ids):
        raise LineProblem(
            INVALID,
            f"'kwargs' has {len(kwargs)} entries but 'instruction_id_list' has {len(ids)}; "
            "expected one kwargs object per instruction id",
        )
    if known_instruction_ids is not None:
        unknown = [i for i in ids if i not in known_instruction_ids]
        if unknown:
            raise LineProblem(
                INVALID,
                f"unknown instruction id(s) {', '.join(map(repr, unknown))}; no checker is registered under that name",
            )
    teacher = None
    if obj.get("teacher_response") is not None:
        teacher = _string_field(obj, "teacher_response")
    elif require_teacher_response:
        raise LineProblem(
            MISSING_FIELD,
            "missing field 'teacher_response' (required: the adversarial term "
            "compares each rollout with the teacher's answer)",
        )
    key = obj.get("key")
    if key is not None and (not isinstance(key, (int, str)) or isinstance(key, bool)):
        raise LineProblem(WRONG_TYPE, f"field 'key' must be an integer or a string, got {_type_name(key)}")
    return ParsedPrompt(messages=messages, instruction_id_list=ids, kwargs=kwargs, teacher_response=teacher, key=key)
