"""Small file helpers for the evaluation tools: atomic writes and checked JSONL reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping


class InputFileError(ValueError):
    """A file that cannot be read as expected; the message names the file and line."""


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write aside, then rename: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _aside(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_savefig(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _aside(path)
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | Path, what: str = "rows") -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; clear errors for everything else."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f.read().split(b"\n"), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputFileError(f"{path}:{n}: not UTF-8 text ({exc})") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputFileError(f"{path}:{n}: not JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(obj, dict):
                raise InputFileError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            out.append((n, obj))
    if not out:
        raise InputFileError(f"{path}: empty; expected {what}, one JSON object per line")
    return out
