#!/usr/bin/env python
"""How long a trainer checkpoint holds training up: a synchronous save against an asynchronous one (the
trainer's default), and how long the asynchronous one takes to complete in the background.

One rank (gloo on CPU, or one GPU), the Megatron student of a Qwen3 shape with random weights, AdamW state
after one optimizer step, the trainer's Checkpointer (torch_dist, fully parallel, fully_reshardable optimizer
state) writing into --dir. Each mode saves --repeats times; medians. The last line is JSON: params, bytes
written per checkpoint, sync_save_s, async_blocking_s (until training may go on), async_complete_s (until
`latest` moved), others_cpu (the share of the machine's CPU time other processes used meanwhile; well above 0,
the figures were measured under load).

  python benchmarks/checkpoint_save.py [--shape cpu_100m] [--repeats 3] [--dir /tmp/ckpt_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from uniapl_megatron.plan_memory import KNOWN_SHAPES

SHAPES = {
    "cpu_100m": {
        "vocab_size": 32000,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
    "0.6b": dict(KNOWN_SHAPES["Qwen/Qwen3-0.6B"]),
}


def _busy_s() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    """CPU seconds of this process and its (finished, waited-for) children: the forked writers."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _student(shape: str) -> tuple[Any, str]:
    """The one-rank Megatron student of SHAPES[shape], random weights and Adam moments as after a step; its dtype."""
    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.models.arch import Qwen3Arch
    from uniapl_megatron.models.qwen3 import ModelConfig
    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.trainer.optim import OptimConfig
    from uniapl_megatron.trainer.student import Student

    par = ParallelConfig()
    init_distributed(par)
    arch = Qwen3Arch.from_hf_dict({"model_type": "qwen3", **SHAPES[shape]})
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    student = Student(arch, par, ModelConfig(dtype=dtype), OptimConfig(lr=1e-5))
    with torch.no_grad():
        for c in student.chunks:
            for p in c.parameters():
                p.normal_(0, 0.02)
    student._refresh_main_params()
    for opt in getattr(student.optimizer, "chained_optimizers", [student.optimizer]):
        opt._init_optimizer_states_with_dummy_values()  # Adam's moments exist, as after a step
    return student, dtype


def _measure(student: Any, root: Path, fmt: str, mode: str, repeats: int) -> dict[str, Any]:
    """Medians of `repeats` saves in one optimizer format and mode (after a warm-up save) and the bytes of one
    checkpoint; keys of the non-default format carry its name."""
    from uniapl_megatron.trainer.checkpoint import Checkpointer

    key = "" if fmt == "fully_reshardable" else f"{fmt}_"
    ckpt = Checkpointer(root / mode, async_save=mode == "async", optim_format=fmt, keep_last=1)
    blocking, complete = [], []
    for i in range(repeats + 1):  # the first save of each mode is a warm-up (plans, caches)
        t0 = time.perf_counter()
        ckpt.save(i + 1, student)  # the student's own state: its LR schedule
        t1 = time.perf_counter()
        ckpt.finalize()
        t2 = time.perf_counter()
        if i:
            blocking.append(t1 - t0)
            complete.append(t2 - t0)
    ckpt.close()
    res: dict[str, Any] = {}
    if mode == "sync":
        res[f"{key}sync_save_s"] = round(statistics.median(blocking), 3)
    else:
        res[f"{key}async_blocking_s"] = round(statistics.median(blocking), 3)
        res[f"{key}async_complete_s"] = round(statistics.median(complete), 3)
    res[f"{key}checkpoint_bytes"] = sum(f.stat().st_size for f in (root / mode).rglob("*") if f.is_file())
    shutil.rmtree(root / mode, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="cpu_100m", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/uniapl_ckpt_bench")
    ap.add_argument(
        "--formats",
        default="fully_reshardable,dp_reshardable",
        help="optimizer formats to measure (keys of the non-default one carry its name)",
    )
    a = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")

    student, dtype = _student(a.shape)
    params = sum(p.numel() for c in student.chunks for p in c.parameters())
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    res: dict = {
        "shape": a.shape,
        "params": params,
        "dtype": dtype,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    b0, o0, w0 = _busy_s(), _own_s(), time.perf_counter()
    for fmt, mode in [(f, m) for f in a.formats.split(",") for m in ("sync", "async")]:
        res.update(_measure(student, root, fmt, mode, a.repeats))
    b1, o1, wall = _busy_s(), _own_s(), time.perf_counter() - w0
    if b0 is not None and b1 is not None and not torch.cuda.is_available():
        res["others_cpu"] = round(max(0.0, (b1 - b0) - (o1 - o0)) / (wall * os.cpu_count()), 2)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
