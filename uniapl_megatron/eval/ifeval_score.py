"""IFEval scoring: prompt- and instruction-level accuracy, strict and loose, per instruction type.

The metrics are IFEval's (and lm-eval's ``ifeval`` task's): prompt-level = share of prompts
whose every instruction is followed; instruction-level = share of all instructions followed.
Checks run through ``rewards.ifeval.InstructionChecker``, i.e. the upstream checkers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from uniapl_megatron.eval.io import InputFileError, read_jsonl
from uniapl_megatron.rewards.ifeval import InstructionChecker


class ResponsesFileError(InputFileError):
    """A responses file that cannot be scored; the message names the file, line and field."""


@dataclass
class PromptResult:
    key: Any
    instruction_id_list: list[str]
    strict: list[bool]  # per instruction, strict mode
    loose: list[bool]  # per instruction, loose mode
    response_chars: int


def score_rows(rows: Sequence[Mapping[str, Any]], responses: Sequence[str], seed: int = 0) -> list[PromptResult]:
    """Check each response against its row's instructions, in both modes."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} prompt rows but {len(responses)} responses")
    checker = InstructionChecker(seed=seed)
    out = []
    for i, (row, resp) in enumerate(zip(rows, responses)):
        where = f"prompt {row.get('key', i)}"
        out.append(
            PromptResult(
                key=row.get("key", i),
                instruction_id_list=list(row["instruction_id_list"]),
                strict=checker.check(row, resp, "strict", where=where),
                loose=checker.check(row, resp, "loose", where=where),
                response_chars=len(resp),
            )
        )
    return out


def _acc(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(results: Sequence[PromptResult]) -> dict[str, Any]:
    """The four headline metrics (fractions in [0, 1]) and per-instruction / per-category breakdowns."""
    if not results:
        raise ValueError("no results to summarize")
    inst_strict = [v for r in results for v in r.strict]
    inst_loose = [v for r in results for v in r.loose]
    per: dict[str, dict[str, list[bool]]] = defaultdict(lambda: {"strict": [], "loose": []})
    cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: {"strict": [], "loose": []})
    for r in results:
        for iid, s, lo in zip(r.instruction_id_list, r.strict, r.loose):
            for table, name in ((per, iid), (cat, iid.split(":")[0])):
                table[name]["strict"].append(s)
                table[name]["loose"].append(lo)

    def breakdown(table: Mapping[str, Mapping[str, list[bool]]]) -> dict[str, dict[str, float]]:
        return {
            k: {"count": len(v["strict"]), "strict": _acc(v["strict"]), "loose": _acc(v["loose"])}
            for k, v in sorted(table.items())
        }

    return {
        "prompt_strict": _acc([all(r.strict) for r in results]),
        "prompt_loose": _acc([all(r.loose) for r in results]),
        "instruction_strict": _acc(inst_strict),
        "instruction_loose": _acc(inst_loose),
        "num_prompts": len(results),
        "num_instructions": len(inst_strict),
        "per_instruction": breakdown(per),
        "per_category": breakdown(cat),
    }


def to_markdown(summary: Mapping[str, Any], title: str = "IFEval") -> str:
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731
    lines = [
        f"## {title}",
        "",
        f"{summary['num_prompts']} prompts, {summary['num_instructions']} instructions.",
        "",
        "| level | strict | loose |",
        "|---|---:|---:|",
        f"| prompt | {pct(summary['prompt_strict'])} | {pct(summary['prompt_loose'])} |",
        f"| instruction | {pct(summary['instruction_strict'])} | {pct(summary['instruction_loose'])} |",
        "",
        "| instruction type | count | strict | loose |",
        "|---|---:|---:|---:|",
    ]
    for iid, v in summary["per_instruction"].items():
        lines.append(f"| {iid} | {v['count']} | {pct(v['strict'])} | {pct(v['loose'])} |")
    return "\n".join(lines) + "\n"


def results_json(
    results: Sequence[PromptResult], summary: Mapping[str, Any], meta: Mapping[str, Any]
) -> dict[str, Any]:
    return {**meta, "metrics": dict(summary), "per_prompt": [asdict(r) for r in results]}


def read_responses(path: str | Path, known_keys: Sequence[Any], allow_partial: bool = False) -> dict[str, str]:
    """``{str(key): response}`` from a JSONL of ``{"key": ..., "response": ...}`` lines, checked.

    Keys are compared as strings, so 1000 and "1000" name the same IFEval prompt.
    """
    known = {str(k) for k in known_keys}
    out: dict[str, str] = {}
    for n, obj in read_jsonl(path, what='{"key": ..., "response": ...} objects'):
        for field in ("key", "response"):
            if field not in obj:
                raise ResponsesFileError(f"{path}:{n}: missing field {field!r} (expected 'key' and 'response')")
        key, resp = obj["key"], obj["response"]
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ResponsesFileError(f"{path}:{n}: 'key' must be an integer or string, got {key!r}")
        if not isinstance(resp, str):
            raise ResponsesFileError(f"{path}:{n}: 'response' must be a string, got {type(resp).__name__}")
        skey = str(key)
        if skey not in known:
            raise ResponsesFileError(f"{path}:{n}: unknown key {key!r}: no prompt has it")
        if skey in out:
            raise ResponsesFileError(f"{path}:{n}: key {key!r} appears a second time")
        out[skey] = resp
    missing = [k for k in (str(k) for k in known_keys) if k not in out]
    if missing and not allow_partial:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ResponsesFileError(
            f"{path}: no response for {len(missing)} of {len(known)} prompts (keys {shown}); "
            "pass --allow-partial to score only the prompts present"
        )
    return out
