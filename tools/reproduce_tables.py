#!/usr/bin/env python
"""Build the paper-shaped table from evaluation results.

Rows: the algorithm presets (SFT, A-SFT, GRPO, A-GRPO, the staged pipelines, CHORD, A-CHORD,
UniAPL) per student; columns: the benchmarks, their average and the difference to GRPO.
Inputs: result files or folders (``*.json`` / ``*.jsonl``) with records
``{"algorithm", "student", "benchmark", "score"}`` (score a fraction in [0, 1]), such as the
``ifeval.json`` that tools/eval_ifeval.py writes or the ``results/`` folder of ``uniapl sweep``.
Records with a ``seed`` are runs of one cell: the table shows mean ± standard deviation over seeds
and the difference to GRPO with its standard error; records with a ``curve`` also give
curves/<student>/<preset>.png (learning curves, mean over seeds).

  python tools/reproduce_tables.py outputs/ --out outputs/tables
  python tools/reproduce_tables.py results/mini_repro/results --out results/mini_repro
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from uniapl_megatron.eval.io import InputFileError
from uniapl_megatron.eval.tables import load_results, write_report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("results", nargs="+", help="result files or folders")
    ap.add_argument("--out", default="outputs/tables", help="folder for table.md, table.csv and curves/")
    ap.add_argument("--benchmarks", nargs="*", default=None, help="column order (default: as found)")
    ap.add_argument(
        "--metric",
        default=None,
        help="use metrics[METRIC] where a record has it (e.g. prompt_loose) instead of 'score'",
    )
    args = ap.parse_args(argv)
    try:
        report = write_report(load_results(args.results, metric=args.metric), Path(args.out), args.benchmarks)
    except (InputFileError, OSError) as exc:
        print(f"reproduce_tables: error: {exc}", file=sys.stderr)
        return 2
    print(report.pop("table"))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
