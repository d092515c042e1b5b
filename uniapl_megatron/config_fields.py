"""Field checks of every config section, read from the dataclasses' type hints.

A section declares what a field may hold in its annotation, and nothing else checks it:

    engine: Literal["vllm", "torch"] = "vllm"            # one of these strings
    max_model_len: Annotated[int, Ge(2)] = 2048          # an integer (not a bool) >= 2
    lr: Annotated[float, Gt(0), FINITE] = 1e-5           # an int or float, > 0 and finite
    path: Annotated[str, MinLen(1), "a model folder"] = ""   # a plain string in the metadata: how a
                                                          # message describes what is expected

Bounds are annotated-types' (Ge, Gt, Le, Lt, Interval, MinLen, Predicate). ``check_fields`` runs first in
each section's ``__post_init__``, so a section built in code is checked like one read from YAML; what
remains in ``__post_init__`` are the checks that involve several fields. ``coerce_yaml`` is the loader's
part: YAML 1.1 reads ``1e-4`` as a string, and an integer where a float is expected becomes that float.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Annotated, Any, Literal, Union

import annotated_types as at

FINITE = at.Predicate(math.isfinite)
"""A float bound: NaN and +-inf are refused."""

Ge, Gt, Le, Lt, Interval, MinLen, Predicate = at.Ge, at.Gt, at.Le, at.Lt, at.Interval, at.MinLen, at.Predicate


def _is_device(value: str) -> bool:
    return value in ("auto", "cpu", "cuda") or value.startswith("cuda:")


Device = Annotated[str, MinLen(1), Predicate(_is_device), "'auto', 'cpu', 'cuda' or 'cuda:N'"]
"""Where a model runs: 'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""

__all__ = [
    "FINITE",
    "Device",
    "Ge",
    "Gt",
    "Interval",
    "Le",
    "Lt",
    "MinLen",
    "Predicate",
    "check_fields",
    "coerce_yaml",
    "describe",
]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls, include_extras=True).items() if k in names}


def check_fields(obj: Any, section: str, error: type[Exception]) -> None:
    """Raise ``error`` naming ``section.field`` (``field`` for a top-level one, section ""), what it expects and
    the value, at the first field whose value does not fit its annotation."""
    for name, hint in _hints(type(obj)).items():
        value = getattr(obj, name)
        if not _fits(hint, value):
            raise error(f"{f'{section}.{name}' if section else name}: expected {describe(hint)}, got {value!r}")


def coerce_yaml(cls: type, values: dict[str, Any]) -> None:
    """In place: numbers YAML left as strings (``1e-4``) are parsed, integers given for floats become floats.
    What cannot be parsed is left for ``check_fields`` to refuse."""
    hints = _hints(cls)
    for key, value in values.items():
        base = _base(_unoptional(hints.get(key)))
        if base is float and isinstance(value, str):
            try:
                value = values[key] = float(value)
            except ValueError:
                continue
        elif base is int and isinstance(value, str):
            try:
                value = values[key] = int(value)
            except ValueError:
                continue
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)


def _unoptional(hint: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _base(hint: Any) -> Any:
    return typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint


def _fits(hint: Any, value: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Annotated:
        return _fits(args[0], value) and all(_meets(m, value) for m in hint.__metadata__)
    if origin in (Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and (not args or all(_fits(args[0], v) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _meets(meta: Any, value: Any) -> bool:
    if isinstance(meta, str):  # the description of what is expected
        return True
    if isinstance(meta, at.Interval):
        return all(_meets(m, value) for m in meta)
    if isinstance(meta, at.Ge):
        return value >= meta.ge
    if isinstance(meta, at.Gt):
        return value > meta.gt
    if isinstance(meta, at.Le):
        return value <= meta.le
    if isinstance(meta, at.Lt):
        return value < meta.lt
    if isinstance(meta, at.MinLen):
        return len(value) >= meta.min_length
    if isinstance(meta, at.Predicate):
        return bool(meta.func(value))
    raise TypeError(f"config_fields: unsupported annotation {meta!r}")


def describe(hint: Any) -> str:
    """What a field of this hint expects, in words: 'an integer >= 1', "one of 'a', 'b'", '... or null'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Annotated:
        said = [m for m in hint.__metadata__ if isinstance(m, str)]
        if said:
            return said[0]
        return describe(args[0]) + _bounds([m for m in hint.__metadata__ if not isinstance(m, str)])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return "a list" + (f" of {_plural(describe(args[0]))}" if args else "")
    if origin is dict:
        return "a mapping"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(word: str) -> str:
    return {"a string": "strings", "an integer": "integers", "a number": "numbers"}.get(word, word)


def _bounds(metas: list[Any]) -> str:
    flat = [m for meta in metas for m in (meta if isinstance(meta, at.Interval) else [meta])]
    low = next((m for m in flat if isinstance(m, (at.Ge, at.Gt))), None)
    high = next((m for m in flat if isinstance(m, (at.Le, at.Lt))), None)
    finite = " (finite)" if any(m is FINITE for m in flat) and not (low and high) else ""
    if any(isinstance(m, at.MinLen) and m.min_length == 1 for m in flat):
        return " (not empty)"
    if low is not None and high is not None:
        lo = f"[{low.ge!r}" if isinstance(low, at.Ge) else f"({low.gt!r}"
        hi = f"{high.le!r}]" if isinstance(high, at.Le) else f"{high.lt!r})"
        return f" in {lo}, {hi}"
    if low is not None:
        return (f" >= {low.ge!r}" if isinstance(low, at.Ge) else f" > {low.gt!r}") + finite
    if high is not None:
        return (f" <= {high.le!r}" if isinstance(high, at.Le) else f" < {high.lt!r}") + finite
    return finite
