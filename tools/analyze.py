#!/usr/bin/env python
"""Response-length and log-prob distributions of student answers vs teacher answers.

Inputs: two JSONL files over the same prompts. Student rows: {"key" or "prompt", "response"}
(the responses.jsonl of tools/eval_ifeval.py works). Teacher rows: {"key" or "prompt",
"teacher_response"} (the training-data schema) or "response". Rows are paired by "key" when
both files have keys, else by prompt text.

Lengths are in tokens with --tokenizer or --model, else in words. Log-probs (sequence = sum
over the answer's tokens, mean per token, and every token's) need --model: both sides' answers
are scored teacher-forced under that one model, after their chat-formatted prompts.

Writes <out>/analysis.json and PNGs (length.png, and with --model seq_logprob.png,
token_logprob.png); the last stdout line is one JSON summary.

  python tools/analyze.py --student outputs/ifeval/responses.jsonl --teacher data/eval.jsonl \\
      --model runs/demo/hf --out outputs/analysis
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from uniapl_megatron.eval.distributions import compare, plot_comparison
from uniapl_megatron.eval.io import InputFileError, atomic_write_json, read_jsonl


class AnalyzeError(Exception):
    pass


def _rows(path: str, answer_fields: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for n, obj in read_jsonl(path, "answer rows"):
        answer = next((obj[f] for f in answer_fields if f in obj), None)
        if answer is None:
            raise AnalyzeError(f"{path}:{n}: missing field {' or '.join(repr(f) for f in answer_fields)}")
        if not isinstance(answer, str):
            raise AnalyzeError(f"{path}:{n}: the answer must be a string, got {type(answer).__name__}")
        if "key" not in obj and not isinstance(obj.get("prompt"), str):
            raise AnalyzeError(f"{path}:{n}: needs a 'key' or a string 'prompt' to pair it with the other file")
        out.append({"key": obj.get("key"), "prompt": obj.get("prompt"), "answer": answer, "where": f"{path}:{n}"})
    return out


def pair_rows(student: list[dict[str, Any]], teacher: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """(student row, teacher row) pairs, by key when every row has one, else by prompt."""
    field = "key" if all(r["key"] is not None for r in student + teacher) else "prompt"
    index: dict[str, dict[str, Any]] = {}
    for r in teacher:
        if r[field] is None:
            raise AnalyzeError(f"{r['where']}: no {field!r} to pair by")
        k = str(r[field])
        if k in index:
            raise AnalyzeError(f"{r['where']}: {field} {r[field]!r} appears twice in the teacher file")
        index[k] = r
    pairs, seen = [], set()
    for r in student:
        if r[field] is None:
            raise AnalyzeError(f"{r['where']}: no {field!r} to pair by")
        k = str(r[field])
        if k in seen:
            raise AnalyzeError(f"{r['where']}: {field} {r[field]!r} appears twice in the student file")
        seen.add(k)
        if k in index:
            pairs.append((r, index[k]))
    if not pairs:
        raise AnalyzeError(f"no student row shares a {field} with a teacher row; the files must cover the same prompts")
    return pairs


def _logprob_report(
    args: argparse.Namespace, pairs: list, s_ans: list[str], t_ans: list[str], report: dict[str, Any], out_dir: Path
) -> list[str]:
    """Add the log-prob comparisons of both sides' answers under ``args.model`` to `report`; return the plots."""
    from uniapl_megatron.eval.logprobs import answer_token_logprobs

    prompts = []
    for s, t in pairs:
        p = s["prompt"] if isinstance(s["prompt"], str) else t["prompt"]
        if not isinstance(p, str):
            raise AnalyzeError(f"{s['where']}: log-probs need the prompt text, and neither file has it for this row")
        prompts.append(p)
    # one call (one model load) for both sides
    lps = answer_token_logprobs(
        args.model, prompts + prompts, s_ans + t_ans, tokenizer_dir=args.tokenizer, batch_size=args.batch_size
    )
    s_lp, t_lp = lps[: len(pairs)], lps[len(pairs) :]
    s_seq, t_seq = [float(x.sum()) for x in s_lp], [float(x.sum()) for x in t_lp]
    s_tok, t_tok = np.concatenate(s_lp), np.concatenate(t_lp)
    report["seq_logprob"] = compare(s_seq, t_seq)
    report["seq_logprob_per_token"] = compare([float(x.mean()) for x in s_lp], [float(x.mean()) for x in t_lp])
    report["token_logprob"] = compare(s_tok, t_tok)
    report["logprob_model"] = args.model
    plots: list[str] = []
    plots.append(
        str(
            plot_comparison(
                {"student": s_seq, "teacher": t_seq},
                "sequence log-prob",
                "sum of token log-probs",
                out_dir / "seq_logprob.png",
            )
        )
    )
    plots.append(
        str(
            plot_comparison(
                {"student": s_tok, "teacher": t_tok}, "token log-prob", "log-prob", out_dir / "token_logprob.png"
            )
        )
    )
    return plots


def _summary_line(report: dict[str, Any], n_pairs: int, unit: str, out_dir: Path) -> dict[str, Any]:
    """The one-line summary the CLI prints: the headline figures and where the full JSON is."""
    line = {
        "pairs": n_pairs,
        "length_unit": unit,
        "student_length_mean": report["length"]["student"]["mean"],
        "teacher_length_mean": report["length"]["teacher"]["mean"],
        "length_ks": report["length"]["ks"],
        "length_wasserstein": report["length"]["wasserstein"],
    }
    if "seq_logprob" in report:
        line.update(
            {
                "student_seq_logprob_mean": report["seq_logprob"]["student"]["mean"],
                "teacher_seq_logprob_mean": report["seq_logprob"]["teacher"]["mean"],
                "seq_logprob_ks": report["seq_logprob"]["ks"],
                "token_logprob_ks": report["token_logprob"]["ks"],
                "token_logprob_wasserstein": report["token_logprob"]["wasserstein"],
            }
        )
    line["json"] = str(out_dir / "analysis.json")
    return line


def analyze(args: argparse.Namespace) -> dict[str, Any]:
    pairs = pair_rows(_rows(args.student, ("response",)), _rows(args.teacher, ("teacher_response", "response")))
    s_ans = [s["answer"] for s, _ in pairs]
    t_ans = [t["answer"] for _, t in pairs]
    tok = args.tokenizer or args.model
    if tok:
        from uniapl_megatron.eval.logprobs import token_lengths

        lengths = token_lengths(tok, s_ans + t_ans)
        s_len, t_len, unit = lengths[: len(pairs)], lengths[len(pairs) :], "tokens"
    else:
        s_len, t_len, unit = [len(a.split()) for a in s_ans], [len(a.split()) for a in t_ans], "words"
    out_dir = Path(args.out)
    report: dict[str, Any] = {"pairs": len(pairs), "length_unit": unit, "length": compare(s_len, t_len)}
    plots = [
        str(plot_comparison({"student": s_len, "teacher": t_len}, "response length", unit, out_dir / "length.png"))
    ]
    if args.model:
        plots += _logprob_report(args, pairs, s_ans, t_ans, report, out_dir)
    report["plots"] = plots
    atomic_write_json(out_dir / "analysis.json", report)
    return _summary_line(report, len(pairs), unit, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--student", required=True, help="JSONL with the student's answers ('response')")
    ap.add_argument(
        "--teacher", required=True, help="JSONL with the teacher's answers ('teacher_response' or 'response')"
    )
    ap.add_argument("--model", default=None, help="HF model folder that scores both sides' log-probs")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for token lengths (default: --model)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="outputs/analysis")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        line = analyze(args)
    except (AnalyzeError, InputFileError, ValueError, OSError) as exc:
        print(f"analyze: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
