"""`uniapl`: train, rollout, demo, convert.

uniapl train CONFIG.yaml [section.key=value ...]   the UniAPL trainer (torchrun / srun / one process)
uniapl rollout CONFIG.yaml [section.key=value ...] a rollout server for rollout.mode=disaggregated: same
                                                    config and overrides as the trainer; RANK = server index
uniapl demo [section.key=value ...]                 the embedded tiny default (examples/tiny_cpu.yaml)
uniapl generate CONFIG.yaml [section.key=value ...] the teacher's answers, offline, resumable (generate.py)
uniapl convert import|export ...                    same as tools/convert_hf.py
uniapl sweep SWEEP.yaml [--runner local|slurm] ...  presets x students x seeds -> the paper-shaped table
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
        return run_ranks(
            [sys.executable, "-m", "uniapl_megatron.cli", "train", *([config] if config else []), *overrides], world
        )
    from .rollout.digest import RefitMismatchError
    from .trainer.loop import NonFiniteLossError, Trainer
    from .trainer.preflight import PreflightError

    try:
        summary = Trainer(cfg).run()
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, PreflightError, RefitMismatchError) as e:  # checkpoints stay as they were
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(json.dumps(summary), flush=True)
    return 0


def _rollout(config: str, overrides: list[str]) -> int:
    from .models.arch import ConfigError
    from .rollout.config import RolloutConfigError
    from .trainer.config import load_config

    try:
        cfg = load_config(config, overrides)
        if cfg.rollout is None:
            raise ConfigError(f"{config}: no rollout section (uniapl rollout serves rollout.mode=disaggregated)")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # slurm/_task.sh gives each rollout server RANK / WORLD_SIZE among the servers and LOCAL_RANK on its node;
    # vLLM would read them as a torch.distributed world of its own, so they are taken out once used.
    from .rollout.placement import PlacementError, server_devices

    rank, servers = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "0")) or None
    try:
        gpus = server_devices(
            int(os.environ.get("LOCAL_RANK", "0")),
            cfg.rollout.tensor_parallel_size,
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
    except PlacementError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if gpus is not None:  # before torch or vLLM look at the GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)
    from .rollout.server import serve

    try:
        return serve(cfg.rollout, rank, servers)
    except (RolloutConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TimeoutError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="uniapl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run the trainer")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="section.key=value (value parsed as YAML)")
    r = sub.add_parser("rollout", help="a rollout server for rollout.mode=disaggregated (one per rollout node)")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="section.key=value, the same as the trainer's")
    d = sub.add_parser("demo", help="the embedded tiny CPU default")
    d.add_argument("overrides", nargs="*")
    sub.add_parser("convert", help="HF <-> Megatron weights (tools/convert_hf.py)", add_help=False)
    g = sub.add_parser("generate", help="teacher answers for a prompt set through vLLM (resumable)")
    g.add_argument("config")
    g.add_argument("overrides", nargs="*", help="section.key=value (sections: teacher, generate)")
    sub.add_parser("sweep", help="presets x students x seeds: train -> export -> evaluate -> table", add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "convert":
        from .convert.cli import main as convert_main

        return convert_main(rest)
    if args.cmd == "sweep":
        from .sweep import main as sweep_main

        return sweep_main(rest)
    if rest:
        ap.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.cmd == "demo":
        from .demo import prepare

        prepare(ROOT / "runs" / "demo_assets")
        return _train(str(TINY), args.overrides)
    if args.cmd == "rollout":
        return _rollout(args.config, args.overrides)
    if args.cmd == "generate":
        from .generate import cli_main

        return cli_main(args.config, args.overrides)
    return _train(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
