"""The paper-shaped results table: algorithm presets per student size x benchmarks, plus average.

A result record is ``{"algorithm", "student", "benchmark", "score"}`` with the score a fraction
in [0, 1] (``tools/eval_ifeval.py`` writes one per run; ``uniapl sweep`` one per cell and
benchmark), optionally with ``"seed"`` (runs that differ only by their seed) and ``"curve"``
(``{metric: [[step, value], ...]}``, drawn by ``eval/curves.py``). Records may sit in ``.json``
files (one object, or a list) or ``.jsonl`` files, or in folders of them.

Cells are percentages: the mean over seeds, with the sample standard deviation when there are
several. The average is over the table's benchmarks (left empty for a row that lacks one of them);
its spread is the standard deviation of the per-seed averages. "Δ GRPO" is the row's average minus
GRPO's for the same student, with the standard error of that difference of two means,
sqrt(sd_a^2 / n_a + sd_grpo^2 / n_grpo).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    seed: int | None = None  # runs of one cell that differ only by their seed
    curve: dict[str, list] | None = field(default=None, compare=False, hash=False)  # {metric: [[step, value]]}


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
    for key in ("algorithm", "student", "benchmark"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise ResultsError(f"{where}: field {key!r} must be a non-empty string, got {obj.get(key)!r}")
    if metric and isinstance(obj.get("metrics"), dict) and metric in obj["metrics"]:
        score = obj["metrics"][metric]
    elif "score" in obj:
        score = obj["score"]
    else:
        raise ResultsError(f"{where}: missing field 'score'" + (f" (and no metrics.{metric})" if metric else ""))
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
        raise ResultsError(f"{where}: score must be a fraction in [0, 1], got {score!r}")
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ResultsError(f"{where}: seed must be an integer, got {seed!r}")
    curve = obj.get("curve")
    if curve is not None and not (isinstance(curve, dict) and all(isinstance(v, list) for v in curve.values())):
        raise ResultsError(f"{where}: curve must be an object of [[step, value], ...] lists")
    return Result(
        canonical_algorithm(obj["algorithm"]),
        obj["student"].strip(),
        obj["benchmark"].strip(),
        float(score),
        where,
        seed,
        curve,
    )


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
        out += [
            _record(obj, f"{f}" + (f"[{i}]" if isinstance(data, list) else ""), metric) for i, obj in enumerate(items)
        ]
    return out


def _size_key(student: str) -> tuple[float, str]:
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB]\b", student)
    return (float(m.group(1)) if m else float("inf"), student)


@dataclass
class Table:
    benchmarks: list[str]
    # student, algorithm, label, scores {benchmark: mean %}, sd {benchmark: sd % | None}, n {benchmark: seeds},
    # average, average_sd, delta_grpo, delta_grpo_se, seeds
    rows: list[dict[str, Any]]

    @property
    def several_seeds(self) -> bool:
        return any(r["seeds"] > 1 for r in self.rows)


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cells(results: Sequence[Result]) -> dict[tuple[str, str, str], dict[int | None, Result]]:
    """(student, algorithm, benchmark) -> {seed: result}; one result per seed."""
    cells: dict[tuple[str, str, str], dict[int | None, Result]] = {}
    for r in results:
        runs = cells.setdefault((r.student, r.algorithm, r.benchmark), {})
        if r.seed in runs:
            seed = "" if r.seed is None else f" (seed {r.seed})"
            raise ResultsError(
                f"two results for {r.student} / {r.algorithm} / {r.benchmark}{seed}: "
                f"{runs[r.seed].source} and {r.source}"
            )
        runs[r.seed] = r
    return cells


def _row(student: str, algo: str, bench: list[str], cells: dict) -> dict[str, Any] | None:
    runs = {b: cells[(student, algo, b)] for b in bench if (student, algo, b) in cells}
    if not runs:
        return None
    row: dict[str, Any] = {
        "student": student,
        "algorithm": algo,
        "label": ALGORITHM_LABELS.get(algo, algo),
        "scores": {},
        "sd": {},
        "n": {},
        "average": None,
        "average_sd": None,
        "average_n": 0,
    }
    for b, by_seed in runs.items():
        row["scores"][b], row["sd"][b] = _mean_sd([100 * r.score for r in by_seed.values()])
        row["n"][b] = len(by_seed)
    row["seeds"] = max(row["n"].values())
    if len(runs) == len(bench):
        row["average"] = sum(row["scores"].values()) / len(bench)
        common = set.intersection(*(set(by_seed) for by_seed in runs.values()))
        per_seed = [sum(100 * runs[b][s].score for b in bench) / len(bench) for s in common]
        row["average_n"] = len(per_seed)
        row["average_sd"] = _mean_sd(per_seed)[1] if per_seed else None
    return row


def build_table(results: Sequence[Result], benchmarks: Sequence[str] | None = None) -> Table:
    if not results:
        raise ResultsError("no result records")
    cells = _cells(results)
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
        block = [row for algo in known + unknown if (row := _row(student, algo, bench, cells)) is not None]
        base = next((row for row in block if row["algorithm"] == "grpo"), None)
        for row in block:
            row["delta_grpo"] = row["delta_grpo_se"] = None
            if base is None or row["average"] is None or base["average"] is None:
                continue
            row["delta_grpo"] = row["average"] - base["average"]
            if row is not base and row["average_sd"] is not None and base["average_sd"] is not None:
                row["delta_grpo_se"] = math.sqrt(
                    row["average_sd"] ** 2 / row["average_n"] + base["average_sd"] ** 2 / base["average_n"]
                )
        rows += block
    return Table(bench, rows)


def _fmt(x: float | None, signed: bool = False, spread: float | None = None) -> str:
    if x is None:
        return "–"
    text = f"{x:+.2f}" if signed else f"{x:.2f}"
    return text if spread is None else f"{text} ± {spread:.2f}"


def to_markdown(table: Table) -> str:
    """One row per (student, method). With several seeds: mean ± sd, Δ ± its standard error, and a Seeds column."""
    many = table.several_seeds
    head = ["Student", "Method", *table.benchmarks, "Avg.", "Δ GRPO (± s.e.)" if many else "Δ GRPO"]
    head += ["Seeds"] if many else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in table.rows:
        vals = [_fmt(r["scores"].get(b), spread=r["sd"].get(b)) for b in table.benchmarks]
        cells = [
            r["student"],
            r["label"],
            *vals,
            _fmt(r["average"], spread=r["average_sd"]),
            _fmt(r["delta_grpo"], True, r["delta_grpo_se"]),
        ]
        lines.append("| " + " | ".join(cells + ([str(r["seeds"])] if many else [])) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Means (in %) first, as before seeds were counted; then the spreads and the seed count."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}"

    w.writerow(
        [
            "student",
            "algorithm",
            *table.benchmarks,
            "average",
            "delta_vs_grpo",
            *[f"{b}_sd" for b in table.benchmarks],
            "average_sd",
            "delta_vs_grpo_se",
            "seeds",
        ]
    )
    for r in table.rows:
        w.writerow(
            [
                r["student"],
                r["algorithm"],
                *[num(r["scores"].get(b)) for b in table.benchmarks],
                num(r["average"]),
                num(r["delta_grpo"]),
                *[num(r["sd"].get(b)) for b in table.benchmarks],
                num(r["average_sd"]),
                num(r["delta_grpo_se"]),
                r["seeds"],
            ]
        )
    return buf.getvalue()


def table_summary(table: Table) -> Mapping[str, Any]:
    return {
        "rows": len(table.rows),
        "benchmarks": table.benchmarks,
        "students": list(dict.fromkeys(r["student"] for r in table.rows)),
        "seeds": max((r["seeds"] for r in table.rows), default=0),
    }


def write_report(results: Sequence[Result], out: str | Path, benchmarks: Sequence[str] | None = None) -> dict[str, Any]:
    """table.md, table.csv and, for results that carry learning curves, curves/*.png under ``out``."""
    from .curves import plot_curves
    from .io import atomic_write_text

    table = build_table(results, benchmarks)
    out = Path(out)
    md = atomic_write_text(out / "table.md", to_markdown(table))
    csv_path = atomic_write_text(out / "table.csv", to_csv(table))
    plots = plot_curves(results, out / "curves")
    return {
        **table_summary(table),
        "markdown": str(md),
        "csv": str(csv_path),
        "curves": [str(p) for p in plots],
        "table": to_markdown(table),
    }
