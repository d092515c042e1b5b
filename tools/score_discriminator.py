#!/usr/bin/env python
"""Score (prompt, reference, response) rows with a discriminator, to check it before training.

  python tools/score_discriminator.py --disc models/POLAR-1_8B --input triples.jsonl [--out scores.txt]

Each input line is {"prompt": str, "reference": str, "response": str}. Prints one score per line
(or writes them to --out, atomically), then one JSON line: count, mean, std, min, max, seconds, kind.
The kind is read from the folder (InternLM2ForRewardModel -> polar, else frozen) unless --kind says.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from uniapl_megatron.discriminator import DiscriminatorConfig, DiscriminatorError, build_discriminator
from uniapl_megatron.discriminator.polar import ARCHITECTURE
from uniapl_megatron.eval.io import InputFileError, atomic_write_text, read_jsonl

FIELDS = ("prompt", "reference", "response")


def read_triples(path: str) -> tuple[list[str], list[str], list[str]]:
    """The three columns of the input file; errors name the file, line and field."""
    cols: tuple[list[str], list[str], list[str]] = ([], [], [])
    for n, obj in read_jsonl(path, what='{"prompt", "reference", "response"} objects'):
        for col, field in zip(cols, FIELDS):
            if field not in obj:
                raise InputFileError(f"{path}:{n}: missing field {field!r} (expected {', '.join(FIELDS)})")
            if not isinstance(obj[field], str):
                raise InputFileError(f"{path}:{n}: {field!r} must be a string, got {type(obj[field]).__name__}")
            col.append(obj[field])
    return cols


def detect_kind(folder: str) -> str:
    try:
        archs = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as exc:
        raise DiscriminatorError(f"--disc {folder}: cannot read config.json ({exc})") from exc
    return "polar" if ARCHITECTURE in archs else "frozen"


def summary(scores: Sequence[float]) -> dict[str, Any]:
    n = len(scores)
    mean = sum(scores) / n
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / n)
    return {"count": n, "mean": mean, "std": std, "min": min(scores), "max": max(scores)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts, refs, responses = read_triples(args.input)
    kind = args.kind or detect_kind(args.disc)
    options: dict[str, Any] = {
        "kind": kind,
        "path": args.disc,
        "dtype": args.dtype,
        "device": args.device,
        "tokenizer_path": args.tokenizer,
        "trust_remote_code": args.trust_remote_code,
    }
    if args.max_tokens_per_batch:
        options["max_tokens_per_batch"] = args.max_tokens_per_batch
    disc = build_discriminator(DiscriminatorConfig(**options))
    t0 = time.perf_counter()
    scores = disc.score(prompts, refs, responses)
    seconds = time.perf_counter() - t0
    lines = "".join(f"{s!r}\n" for s in scores)
    if args.out:
        atomic_write_text(args.out, lines)
    else:
        sys.stdout.write(lines)
    return {
        **summary(scores),
        "seconds": round(seconds, 3),
        "kind": kind,
        "disc": args.disc,
        "input": args.input,
        **({"out": args.out} if args.out else {}),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--disc", required=True, help="discriminator checkpoint folder")
    ap.add_argument("--input", required=True, help='JSONL of {"prompt", "reference", "response"}')
    ap.add_argument("--out", default=None, help="write the scores here (one per line) instead of stdout")
    ap.add_argument("--kind", default=None, choices=("polar", "frozen"), help="default: from config.json")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder, when not the checkpoint's")
    ap.add_argument(
        "--trust-remote-code", action="store_true", help="run the folder's Python code (POLAR: its tokenizer only)"
    )
    ap.add_argument("--max-tokens-per-batch", type=int, default=0, help="polar: tokens per forward (0 = default)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        line = run(args)
    except (InputFileError, DiscriminatorError, OSError) as exc:
        print(f"score_discriminator: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
