"""Analyses (distributions, log-probs, plots) and the paper-shaped table builder."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _tools import PNG_MAGIC  # noqa: E402
from _tools import load_tool as _tool  # noqa: E402

from uniapl_megatron.eval.distributions import compare, ks_statistic, plot_comparison, summary, wasserstein_1  # noqa: E402
from uniapl_megatron.eval.tables import ALGORITHM_LABELS, canonical_algorithm  # noqa: E402

# ---------------------------------------------------------------- distributions


def test_distances_known_values_and_scipy() -> None:
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([0, 0], [5, 5]) == 1.0
    assert wasserstein_1([0.0], [3.0]) == 3.0
    assert wasserstein_1([1, 2, 3], [2, 3, 4]) == pytest.approx(1.0)
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    from scipy import stats  # the reference; a dev dependency of `make test`

    rng = np.random.default_rng(0)
    for _ in range(5):
        a = np.round(rng.normal(size=rng.integers(2, 200)), 1)  # ties included
        b = rng.normal(0.3, 2.0, size=rng.integers(2, 200))
        assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
        assert wasserstein_1(a, b) == pytest.approx(stats.wasserstein_distance(a, b), abs=1e-9)


def test_summary_and_compare() -> None:
    s = summary(list(range(101)))
    assert (s["n"], s["mean"], s["p10"], s["p50"], s["p90"], s["min"], s["max"]) == (
        101,
        50.0,
        10.0,
        50.0,
        90.0,
        0.0,
        100.0,
    )
    c = compare([1, 2, 3], [3, 4, 5])
    assert c["mean_diff"] == -2.0 and c["wasserstein"] == pytest.approx(2.0) and c["ks"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="student: no values"):
        compare([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        summary([1.0, float("nan")])


def test_plot_writes_png(tmp_path: Path) -> None:
    p = plot_comparison({"student": [1, 2, 2, 3], "teacher": [2, 3, 3, 4]}, "t", "x", tmp_path / "sub" / "p.png")
    assert p.read_bytes()[:8] == PNG_MAGIC
    assert not [q for q in p.parent.iterdir() if q.name.startswith(".")]


# ---------------------------------------------------------------- tools/analyze.py


def _pairs_files(tmp_path: Path, n: int = 12) -> tuple[Path, Path, list[dict]]:
    from uniapl_megatron.rewards.synthetic import SyntheticConfig, generate_synthetic

    rows = generate_synthetic(SyntheticConfig(num_rows=n, split="eval"))
    teacher = tmp_path / "teacher.jsonl"
    student = tmp_path / "student.jsonl"
    teacher.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the student adds exactly two words to every answer, in reverse order of the file
    student.write_text(
        "".join(
            json.dumps({"key": r["key"], "prompt": r["prompt"], "response": r["teacher_response"] + " ok then"}) + "\n"
            for r in rows[::-1]
        )
    )
    return student, teacher, rows


def test_analyze_word_lengths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    student, teacher, rows = _pairs_files(tmp_path)
    tool = _tool("analyze")
    assert tool.main(["--student", str(student), "--teacher", str(teacher), "--out", str(tmp_path / "o")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    teacher_words = [len(r["teacher_response"].split()) for r in rows]
    assert line["pairs"] == len(rows) and line["length_unit"] == "words"
    assert line["teacher_length_mean"] == pytest.approx(np.mean(teacher_words))
    assert line["student_length_mean"] - line["teacher_length_mean"] == pytest.approx(2.0)
    assert line["length_wasserstein"] == pytest.approx(2.0)
    report = json.loads((tmp_path / "o" / "analysis.json").read_text())
    assert report["length"]["teacher"]["p50"] == float(np.quantile(teacher_words, 0.5))
    assert (tmp_path / "o" / "length.png").read_bytes()[:8] == PNG_MAGIC


def test_analyze_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    student, teacher, _ = _pairs_files(tmp_path)
    tool = _tool("analyze")
    bad = tmp_path / "bad.jsonl"
    cases = [
        ("not json\n", f"{bad}:1: not JSON"),
        (json.dumps({"key": "k"}) + "\n", f"{bad}:1: missing field 'response'"),
        (json.dumps({"response": "x"}) + "\n", f"{bad}:1: needs a 'key' or a string 'prompt'"),
        ("", f"{bad}: empty"),
        (json.dumps({"key": "nope", "response": "x"}) + "\n", "no student row shares a key"),
    ]
    for text, msg in cases:
        bad.write_text(text)
        assert tool.main(["--student", str(bad), "--teacher", str(teacher), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("analyze: error: ") and msg in err, (msg, err)


# ---------------------------------------------------------------- tables


def test_algorithm_names_match_the_objective_presets() -> None:
    from uniapl_megatron.objective.config import ALGORITHMS

    assert tuple(ALGORITHM_LABELS) == tuple(ALGORITHMS)
    assert canonical_algorithm("A-GRPO") == "a_grpo"
    assert canonical_algorithm("SFT → A-GRPO") == "sft->a_grpo"
    assert canonical_algorithm("a-sft->a-grpo") == "a_sft->a_grpo"
    assert canonical_algorithm("UniAPL") == "uniapl"
    assert canonical_algorithm("my_new_method") == "my_new_method"


def _write_results(tmp_path: Path) -> dict[tuple[str, str, str], float]:
    rng = np.random.default_rng(0)
    expected = {}
    folder = tmp_path / "results"
    folder.mkdir()
    lines = []
    for student in ("Qwen3-4B", "Qwen3-0.6B"):
        for i, algo in enumerate(ALGORITHM_LABELS):
            for bench in ("IFEval", "IFBench"):
                score = round(float(rng.uniform(0.2, 0.9)), 4)
                expected[(student, algo, bench)] = score
                label = ALGORITHM_LABELS[algo] if i % 2 else algo  # both spellings
                lines.append({"algorithm": label, "student": student, "benchmark": bench, "score": score})
    # one eval_ifeval-style file, the rest as JSONL and a JSON list
    (folder / "ifeval.json").write_text(json.dumps({**lines[0], "metrics": {"prompt_loose": 0.5}}))
    (folder / "more.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[1:20]))
    (folder / "sub").mkdir()
    (folder / "sub" / "rest.json").write_text(json.dumps(lines[20:]))
    return expected


def test_reproduce_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = _write_results(tmp_path)
    tool = _tool("reproduce_tables")
    out = tmp_path / "tables"
    assert tool.main([str(tmp_path / "results"), "--out", str(out), "--benchmarks", "IFEval", "IFBench"]) == 0
    json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [r["student"] for r in rows[:10]] == ["Qwen3-0.6B"] * 10  # smaller student first
    assert [r["algorithm"] for r in rows[:10]] == list(ALGORITHM_LABELS)
    for r in rows:
        s, a = r["student"], r["algorithm"]
        ife, ifb = expected[(s, a, "IFEval")], expected[(s, a, "IFBench")]
        assert float(r["IFEval"]) == pytest.approx(100 * ife, abs=0.006)
        assert float(r["average"]) == pytest.approx(50 * (ife + ifb), abs=0.006)
        grpo = 50 * (expected[(s, "grpo", "IFEval")] + expected[(s, "grpo", "IFBench")])
        assert float(r["delta_vs_grpo"]) == pytest.approx(50 * (ife + ifb) - grpo, abs=0.011)
    md = (out / "table.md").read_text().splitlines()
    assert md[0] == "| Student | Method | IFEval | IFBench | Avg. | Δ GRPO |"
    assert "| Qwen3-0.6B | SFT→A-GRPO |" in "\n".join(md) and "| Qwen3-4B | UniAPL |" in "\n".join(md)
    # --metric reads metrics[...] where a record has it
    assert tool.main([str(tmp_path / "results"), "--out", str(tmp_path / "t2"), "--metric", "prompt_loose"]) == 0
    capsys.readouterr()
    t2 = {
        (r["student"], r["algorithm"]): r
        for r in csv.DictReader(io.StringIO((tmp_path / "t2" / "table.csv").read_text()))
    }
    assert t2[("Qwen3-4B", "sft")]["IFEval"] == "50.00"  # the record with metrics
    assert float(t2[("Qwen3-4B", "grpo")]["IFEval"]) == pytest.approx(
        100 * expected[("Qwen3-4B", "grpo", "IFEval")], abs=0.006
    )


def test_reproduce_tables_missing_cell_and_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = _tool("reproduce_tables")
    f = tmp_path / "r.jsonl"
    rec = {"algorithm": "grpo", "student": "s-1b", "benchmark": "A", "score": 0.5}
    f.write_text(
        json.dumps(rec)
        + "\n"
        + json.dumps({**rec, "benchmark": "B", "score": 0.7})
        + "\n"
        + json.dumps({**rec, "algorithm": "uniapl"})
        + "\n"
    )
    assert tool.main([str(f), "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO((tmp_path / "o" / "table.csv").read_text())))
    assert rows[0]["average"] == "60.00" and rows[1]["B"] == "" and rows[1]["average"] == ""
    cases = [
        (json.dumps({**rec, "score": 57.0}), ":1: score must be a fraction in [0, 1], got 57.0"),
        (
            json.dumps({k: v for k, v in rec.items() if k != "student"}),
            ":1: field 'student' must be a non-empty string",
        ),
        (json.dumps({k: v for k, v in rec.items() if k != "score"}), ":1: missing field 'score'"),
        (json.dumps(rec) + "\n" + json.dumps(rec), "two results for s-1b / grpo / A"),
        ("{oops", ":1: not JSON"),
        ("", "empty"),
    ]
    for text, msg in cases:
        f.write_text(text)
        assert tool.main([str(f), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("reproduce_tables: error: ") and msg in err, (msg, err)
    assert tool.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
