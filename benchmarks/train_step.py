"""Tokens/s, MFU and peak memory of one training step of the Megatron student, and of transformers on the
same shape in the same run (the baseline).

GPU (default there): the Qwen3-0.6B and -1.7B shapes, micro-batch 8 x 2048 tokens, bf16, AdamW; the last line's
top-level keys are the first shape's (0.6B, the target), every shape's figures are under "by_shape".
CPU: a small shape so the benchmark always runs. Ours packs the micro-batch into one thd row, computes the
loss with the tiled vocab-parallel log-prob head (never the full logits), and uses the torch-native spec
(SDPA) unless Transformer Engine is present. One JSON line last: device, tokens_s, mfu, peak_mem_gb,
baseline_tokens_s, baseline_peak_mem_gb, others_cpu (and baseline_others_cpu): the share of the machine's CPU
time that other processes used while the steps were timed (see _machine.py; on 2 cores a competing process slows
our 2-thread step 2-6x, one step more than another, and a median of 3 steps does not hide it), settings (both
sides'), machine and date.

--recompute-compare adds our step with model.recompute none and full, each in its own process, on the same
shape (keys recompute_{none,full}_{tokens_s,peak_mem_gb,others_cpu}): what full recomputation saves in peak
memory and costs in speed. On CPU peak memory is the process's peak RSS, so use a shape where activations dominate it:
`--shape cpu_deep --seq 2048 --skip-baseline --recompute-compare` (12 layers, 4,096-entry vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from _machine import OthersCpu, machine

from uniapl_megatron.plan_memory import KNOWN_SHAPES

SHAPES = {
    "0.6b": dict(KNOWN_SHAPES["Qwen/Qwen3-0.6B"]),
    "1.7b": dict(KNOWN_SHAPES["Qwen/Qwen3-1.7B"]),
    "cpu": dict(
        vocab_size=151936,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
    ),
    # deep and narrow with a small vocabulary: the layers' activations, not the LM head, set the peak
    "cpu_deep": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    ),
}
# GPU micro-batch per shape: the transformers baseline at 1.7B and 8 x 2048 does not fit an 80 GB H100.
GPU_MB = {"0.6b": 8, "1.7b": 4}
PEAK_FLOPS = 989e12  # H100 SXM dense bf16


def flops_per_token(c: dict, seq: int) -> float:
    h, L, d = c["hidden_size"], c["num_hidden_layers"], c["head_dim"]
    attn_w = h * d * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    n = L * (attn_w + 3 * h * c["intermediate_size"]) + c["vocab_size"] * h  # + LM head
    causal_attn = 6 * L * seq * c["num_attention_heads"] * d  # 12 * L * s * heads*d / 2 (causal)
    return 6 * n + causal_attn


def timed(fn, steps: int, warmup: int) -> tuple[float, float | None]:
    """Median seconds per step, and the share of the machine's CPU time other processes used meanwhile."""
    for _ in range(warmup):
        fn()
    times = []
    meter = OthersCpu()
    for _ in range(steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), meter.share()


def peak_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ours(
    cfg: dict, mb: int, seq: int, dtype: str, recompute: str, steps: int, warmup: int
) -> tuple[float, float, float | None]:
    from uniapl_megatron.data.packing import pack_sequences
    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.models.arch import Qwen3Arch
    from uniapl_megatron.models.qwen3 import ModelConfig
    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.trainer.optim import OptimConfig
    from uniapl_megatron.trainer.student import MicroBatch, Student

    par = ParallelConfig()
    init_distributed(par)
    arch = Qwen3Arch.from_hf_dict({"model_type": "qwen3", **cfg})
    student = Student(arch, par, ModelConfig(dtype=dtype, recompute=recompute), OptimConfig(lr=1e-5))
    g = torch.Generator().manual_seed(0)
    packed = pack_sequences(
        [torch.randint(0, cfg["vocab_size"], (seq,), generator=g).tolist() for _ in range(mb)], [1] * mb
    )
    if torch.cuda.is_available():
        packed = packed.to("cuda")
    batch = [MicroBatch(packed)]
    n_tok = packed.loss_mask.sum()

    def loss_fn(m, out):
        loss = -(out * m.packed.loss_mask[0]).sum() / n_tok
        return loss, {"loss": loss.detach()}

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sec, others = timed(lambda: student.train_step(batch, loss_fn), steps, warmup)
    return sec, peak_gb(), others


def baseline(cfg: dict, mb: int, seq: int, dtype: str, steps: int, warmup: int) -> tuple[float, float, float | None]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = Qwen3ForCausalLM(Qwen3Config(**cfg, attn_implementation="sdpa")).to(dev, tdtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev == "cuda")
    ids = torch.randint(0, cfg["vocab_size"], (mb, seq), device=dev)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sec, others = timed(step, steps, warmup)
    return sec, peak_gb(), others


def run_part(a: argparse.Namespace, shape: str, mb: int, part: str, recompute: str) -> dict:
    """One side of the comparison in a process of its own, so that its peak memory is its own. A failed
    baseline (out of memory, say) is reported, not fatal."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        __file__,
        "--shape",
        shape,
        "--mb",
        str(mb),
        "--seq",
        str(a.seq),
        "--recompute",
        recompute,
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--part",
        part,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        if part == "baseline":
            return {
                "sec": float("nan"),
                "peak": float("nan"),
                "others": None,
                "error": out.stderr.strip().splitlines()[-1][:200],
            }
        raise SystemExit(f"{part} ({shape}, recompute={recompute}) failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(a: argparse.Namespace, shape: str, dtype: str, on_gpu: bool) -> dict:
    cfg = SHAPES[shape]
    mb = a.mb or (GPU_MB.get(shape, 8) if on_gpu else 2)
    tokens, fpt = mb * a.seq, flops_per_token(cfg, a.seq)
    nan = {"sec": float("nan"), "peak": float("nan"), "others": None}
    b = nan if a.skip_baseline else run_part(a, shape, mb, "baseline", "none")
    o = run_part(a, shape, mb, "ours", a.recompute)

    def share(r: dict) -> float | None:
        return None if r["others"] is None else round(r["others"], 2)

    def mfu(sec: float) -> float | None:
        return round(tokens / sec * fpt / PEAK_FLOPS, 4) if on_gpu else None

    res = {
        "shape": shape,
        "micro_batch": mb,
        "seq": a.seq,
        "dtype": dtype,
        "recompute": a.recompute,
        "tokens_s": round(tokens / o["sec"], 1),
        "mfu": mfu(o["sec"]),
        "peak_mem_gb": round(o["peak"], 2),
        "baseline_tokens_s": round(tokens / b["sec"], 1),
        "baseline_mfu": mfu(b["sec"]),
        "baseline_peak_mem_gb": round(b["peak"], 2),
        "others_cpu": share(o),
        "baseline_others_cpu": share(b),
        **({"baseline_error": b["error"]} if "error" in b else {}),
    }
    if a.recompute_compare:
        for mode in ("none", "full"):
            r = o if mode == a.recompute else run_part(a, shape, mb, "ours", mode)
            res[f"recompute_{mode}_tokens_s"] = round(tokens / r["sec"], 1)
            res[f"recompute_{mode}_peak_mem_gb"] = round(r["peak"], 3)
            res[f"recompute_{mode}_others_cpu"] = share(r)
    return res


def settings(a: argparse.Namespace, dtype: str) -> dict:
    """Both sides' settings, as the JSON line states them."""
    from uniapl_megatron.trainer.optim import OptimConfig

    return {
        "ours": {
            "model": "Megatron-core GPTModel, spec auto (Transformer Engine if present, else torch SDPA)",
            "data": "one packed (thd) micro-batch",
            "loss": "tiled vocab-parallel log-prob head (trainer/logprobs.py)",
            "chunk_tokens": OptimConfig().chunk_tokens,
            "recompute": a.recompute,
            "optimizer": "Megatron distributed Adam, lr 1e-5",
        },
        "baseline": {
            "model": "transformers Qwen3ForCausalLM, SDPA",
            "data": "padded [mb, seq] batch",
            "loss": "model(labels=...) cross-entropy over full logits",
            "optimizer": "torch AdamW, lr 1e-5 (fused on GPU)",
        },
        "dtype": dtype,
        "seq": a.seq,
        "steps": a.steps,
        "warmup": a.warmup,
        "timed": "median of steps",
    }


def main() -> None:
    on_gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shape",
        default="0.6b,1.7b" if on_gpu else "cpu",
        help=f"one or several (comma-separated) of {', '.join(SHAPES)}",
    )
    ap.add_argument(
        "--mb",
        type=int,
        default=None,
        help="sequences per micro-batch (default: 8 for 0.6b, 4 for 1.7b on GPU; 2 on CPU)",
    )
    ap.add_argument("--seq", type=int, default=2048 if on_gpu else 256)
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    ap.add_argument(
        "--recompute-compare", action="store_true", help="also measure ours with recompute none and full (extra keys)"
    )
    ap.add_argument("--steps", type=int, default=5 if on_gpu else 3)
    ap.add_argument("--warmup", type=int, default=2 if on_gpu else 1)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--part", choices=["ours", "baseline"], help="(internal) run one side in this process")
    a = ap.parse_args()
    shapes = a.shape.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shape: unknown {', '.join(unknown)}; expected {', '.join(SHAPES)}")
    dtype = "bf16" if on_gpu else "fp32"
    if a.part:
        cfg = SHAPES[shapes[0]]
        if a.part == "ours":
            sec, peak, others = ours(cfg, a.mb, a.seq, dtype, a.recompute, a.steps, a.warmup)
        else:
            sec, peak, others = baseline(cfg, a.mb, a.seq, dtype, a.steps, a.warmup)
        print(json.dumps({"sec": sec, "peak": peak, "others": others}))
        return
    by_shape = {}
    for shape in shapes:
        by_shape[shape] = measure(a, shape, dtype, on_gpu)
        print(json.dumps(by_shape[shape]), flush=True)  # each shape as soon as it is measured
    device = torch.cuda.get_device_name() if on_gpu else f"cpu ({os.cpu_count()} cores)"
    last = {
        "device": device,
        **by_shape[shapes[0]],
        "settings": settings(a, dtype),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if len(shapes) > 1:
        last["by_shape"] = by_shape
    print(json.dumps(last))


if __name__ == "__main__":
    main()
