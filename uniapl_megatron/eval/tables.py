"""The paper-shaped results table: algorithm presets per student size x benchmarks, plus average.

A result record is ``{"algorithm", "student", "benchmark", "score"}`` with the score a fraction
in [0, 1] (``tools/eval_ifeval.py`` writes one per run; other evaluators can write the same).
Records may sit in ``.json`` files (one object, or a list) or ``.jsonl`` files, or in folders of
them. Cells are percentages; the average is over the table's benchmarks and is left empty for
a row that lacks one of them; "Δ GRPO" is the row's average minus GRPO's for the same student.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from uniapl_megatron.eval.io import InputFileError, read_jsonl

# The presets' config names (objective.config.ALGORITHMS) and the labels the paper uses, in table order.
ALGORITHM_LABELS: dict[str, str] = {
    "sft": "SFT",
    "a_sft": "A-SFT",
    "grpo": "GRPO",
    "a_grpo": "A-GRPO",
    "sft->grpo": "SFT→GRPO",
    "sft->a_grpo": "SFT→A-GRPO",
    "a_sft->a_grpo": "A-SFT→A-GRPO",
    "chord": "CHORD",
    "a_chord": "A-CHORD",
    "uniapl": "UniAPL",
}
_BY_LABEL = {v.lower(): k for k, v in ALGORITHM_LABELS.items()}


class ResultsError(InputFileError):
    """A result record that cannot go in the table; the message names its file and field."""


@dataclass(frozen=True)
class Result:
    algorithm: str  # canonical preset name when known, else as given
    student: str
    benchmark: str
    score: float  # fraction in [0, 1]
    source: str  # file (and line) it came from


def canonical_algorithm(name: str) -> str:
    """'A-GRPO', 'a_grpo', 'SFT → GRPO', 'sft->grpo' ... -> the preset name; unknown names unchanged."""
    s = name.strip().lower().replace("→", "->").replace(" ", "")
    if s in ALGORITHM_LABELS:
        return s
    if s in _BY_LABEL:
        return _BY_LABEL[s]
    t = s.replace("-", "_").replace("_>", "->")
    return t if t in ALGORITHM_LABELS else name.strip()


def _record(obj: Any, where: str, metric: str | None) -> Result:
    if not isinstance(obj, dict):
        raise ResultsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for field in ("algorithm", "student", "benchmark"):
        if not isinstance(obj.get(field), str) or not obj[field].strip():
            raise ResultsError(f"{where}: field {field!r} must be a non-empty string, got {obj.get(field)!r}")
    if metric and isinstance(obj.get("metrics"), dict) and metric in obj["metrics"]:
        score = obj["metrics"][metric]
    elif "score" in obj:
        score = obj["score"]
    else:
        raise ResultsError(f"{where}: missing field 'score'" + (f" (and no metrics.{metric})" if metric else ""))
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
        raise ResultsError(f"{where}: score must be a fraction in [0, 1], got {score!r}")
    return Result(canonical_algorithm(obj["algorithm"]), obj["student"].strip(), obj["benchmark"].strip(), float(score), where)


def load_results(paths: Iterable[str | Path], metric: str | None = None) -> list[Result]:
    """Records from files and folders (``*.json``, ``*.jsonl``, searched recursively).

    ``metric``: take ``metrics[metric]`` instead of ``score`` where a record has it (e.g.
    ``prompt_loose`` from eval_ifeval's output).
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix in (".json", ".jsonl") and q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ResultsError(f"{p}: no such file or folder")
    if not files:
        raise ResultsError(f"no .json or .jsonl result files in {', '.join(map(str, paths))}")
    out: list[Result] = []
    for f in files:
        if f.suffix == ".jsonl":
            out += [_record(obj, f"{f}:{n}", metric) for n, obj in read_jsonl(f, "result records")]
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ResultsError(f"{f}: not JSON ({exc})") from exc
        items = data if isinstance(data, list) else [data]
        if not items:
            raise ResultsError(f"{f}: empty list; expected result records")
        out += [_record(obj, f"{f}" + (f"[{i}]" if isinstance(data, list) else ""), metric) for i, obj in enumerate(items)]
    return out


def _size_key(student: str) -> tuple[float, str]:
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB]\b", student)
    return (float(m.group(1)) if m else float("inf"), student)


@dataclass
class Table:
    benchmarks: list[str]
    rows: list[dict[str, Any]]  # student, algorithm, label, scores {benchmark: pct}, average, delta_grpo


def build_table(results: Sequence[Result], benchmarks: Sequence[str] | None = None) -> Table:
    if not results:
        raise ResultsError("no result records")
    cells: dict[tuple[str, str, str], Result] = {}
    for r in results:
        key = (r.student, r.algorithm, r.benchmark)
        if key in cells:
            raise ResultsError(f"two results for {r.student} / {r.algorithm} / {r.benchmark}: {cells[key].source} and {r.source}")
        cells[key] = r
    if benchmarks:
        missing = [b for b in benchmarks if b not in {r.benchmark for r in results}]
        if missing:
            raise ResultsError(f"no results for benchmark(s) {missing}")
        bench = list(benchmarks)
    else:
        bench = list(dict.fromkeys(r.benchmark for r in results))
    students = sorted({r.student for r in results}, key=_size_key)
    known = list(ALGORITHM_LABELS)
    unknown = sorted({r.algorithm for r in results} - set(known))
    rows = []
    for student in students:
        averages: dict[str, float | None] = {}
        block = []
        for algo in known + unknown:
            scores = {b: 100 * cells[(student, algo, b)].score for b in bench if (student, algo, b) in cells}
            if not scores:
                continue
            avg = sum(scores.values()) / len(bench) if len(scores) == len(bench) else None
            averages[algo] = avg
            block.append({"student": student, "algorithm": algo, "label": ALGORITHM_LABELS.get(algo, algo),
                          "scores": scores, "average": avg})
        base = averages.get("grpo")
        for row in block:
            row["delta_grpo"] = None if base is None or row["average"] is None else row["average"] - base
        rows += block
    return Table(bench, rows)


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def to_markdown(table: Table) -> str:
    head = ["Student", "Method", *table.benchmarks, "Avg.", "Δ GRPO"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in table.rows:
        vals = [_fmt(r["scores"].get(b)) for b in table.benchmarks]
        lines.append("| " + " | ".join([r["student"], r["label"], *vals, _fmt(r["average"]), _fmt(r["delta_grpo"], True)]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["student", "algorithm", *table.benchmarks, "average", "delta_vs_grpo"])
    for r in table.rows:
        w.writerow([r["student"], r["algorithm"],
                    *[("" if r["scores"].get(b) is None else f"{r['scores'][b]:.2f}") for b in table.benchmarks],
                    "" if r["average"] is None else f"{r['average']:.2f}",
                    "" if r["delta_grpo"] is None else f"{r['delta_grpo']:.2f}"])
    return buf.getvalue()


def table_summary(table: Table) -> Mapping[str, Any]:
    return {"rows": len(table.rows), "benchmarks": table.benchmarks,
            "students": list(dict.fromkeys(r["student"] for r in table.rows))}
