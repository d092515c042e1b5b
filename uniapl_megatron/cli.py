"""`uniapl`: train, demo, convert.

    uniapl train CONFIG.yaml [section.key=value ...]   the UniAPL trainer (torchrun / srun / one process)
    uniapl demo [section.key=value ...]                 the embedded tiny default (examples/tiny_cpu.yaml)
    uniapl convert import|export ...                    same as tools/convert_hf.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny_cpu.yaml"


def _train(config: str | None, overrides: list[str], launch: bool = True) -> int:
    from .launch import run_ranks, under_launcher
    from .models.arch import ConfigError
    from .trainer.config import load_config

    try:
        cfg = load_config(config, overrides)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = cfg.parallel.model_parallel_size
    if launch and world > 1 and not under_launcher():
        # A multi-rank layout started as one process: start its ranks here (gloo on CPU).
        return run_ranks([sys.executable, "-m", "uniapl_megatron.cli", "train", *( [config] if config else []), *overrides], world)
    from .trainer.loop import Trainer

    try:
        summary = Trainer(cfg).run()
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uniapl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run the trainer")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="section.key=value (value parsed as YAML)")
    d = sub.add_parser("demo", help="the embedded tiny CPU default")
    d.add_argument("overrides", nargs="*")
    sub.add_parser("convert", help="HF <-> Megatron weights (tools/convert_hf.py)", add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "convert":
        from .convert.cli import main as convert_main

        return convert_main(rest)
    if rest:
        ap.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.cmd == "demo":
        from .demo import prepare

        prepare(ROOT / "runs" / "demo_assets")
        return _train(str(TINY), args.overrides)
    return _train(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
