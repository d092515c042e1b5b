"""`tools/convert_hf.py` / `uniapl convert`: Qwen3 weights between Hugging Face and Megatron formats.

    convert_hf.py import --hf DIR --out DIR [--tp N --pp N --vpp N --ep N] [--dtype bf16|fp32] [--force]
    convert_hf.py export --mcore DIR --out DIR [--tp N --pp N --vpp N --ep N] [--max-shard-size 2GB] [--force]

A layout with more than one rank starts that many local processes (gloo on CPU, one GPU each on GPUs),
unless the command already runs under torchrun or srun.
"""

from __future__ import annotations

import argparse
import re
import sys

from ..launch import run_ranks, under_launcher
from ..models.arch import ConfigError
from ..parallel import ParallelConfig
from .params import ConversionError


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 500MB or 2GB")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_hf.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("import", "export"):
        s = sub.add_parser(name)
        if name == "import":
            s.add_argument("--hf", required=True, help="Hugging Face folder (config.json + *.safetensors)")
            s.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16")
        else:
            s.add_argument("--mcore", required=True, help="checkpoint written by `import` or by the trainer")
            s.add_argument("--max-shard-size", type=_size, default=_size("2GB"), help="per safetensors file")
        s.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
        s.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks doing the work")
        s.add_argument("--pp", type=int, default=1, help="pipeline stages")
        s.add_argument("--vpp", type=int, default=None, help="model chunks per pipeline stage (interleaved)")
        s.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (MoE)")
        s.add_argument("--force", action="store_true", help="replace an existing output folder")
    return p


def _layout(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
        expert_model_parallel_size=args.ep,
    )


def _run(args: argparse.Namespace) -> None:
    from ..distributed import destroy_distributed, init_distributed
    from . import checkpoint

    par = _layout(args)
    init_distributed(par)
    try:
        if args.cmd == "import":
            checkpoint.import_hf(args.hf, args.out, par, args.dtype, force=args.force)
        else:
            checkpoint.export_hf(args.mcore, args.out, par, force=args.force, max_shard_bytes=args.max_shard_size)
    finally:
        destroy_distributed()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        from ..models.arch import Qwen3Arch
        from . import checkpoint

        # Cheap checks first, in one process, so bad input gets one clear message.
        checkpoint.check_output(args.out, args.force)
        if args.cmd == "import":
            arch, _ = checkpoint.check_hf_source(args.hf)
        else:
            meta = checkpoint.read_meta(args.mcore)
            arch = Qwen3Arch(**{**meta["arch"], "moe_layers": tuple(meta["arch"]["moe_layers"])})
        world = args.tp * args.pp * args.ep
        _layout(args).validate(arch, world)
        if world > 1 and not under_launcher():
            return run_ranks([sys.executable, "-m", "uniapl_megatron.convert.cli", *argv], world)
        _run(args)
    except (ConversionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the output folder", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
