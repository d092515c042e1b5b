"""Tokens/s, MFU and peak memory of one training step of the Megatron student, and of transformers on the
same shape in the same run (the baseline).

GPU (default there): Qwen3-0.6B shape (and --shape 1.7b), micro-batch 8 x 2048 tokens, bf16, AdamW.
CPU: a small shape so the benchmark always runs. Ours packs the micro-batch into one thd row, computes the
loss with the chunked vocab-parallel log-prob head (never the full logits), and uses the torch-native spec
(SDPA) unless Transformer Engine is present. One JSON line last: device, tokens_s, mfu, peak_mem_gb,
baseline_tokens_s, baseline_peak_mem_gb.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

SHAPES = {
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "cpu": dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
}
PEAK_FLOPS = 989e12  # H100 SXM dense bf16


def flops_per_token(c: dict, seq: int) -> float:
    h, L, d = c["hidden_size"], c["num_hidden_layers"], c["head_dim"]
    attn_w = h * d * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    n = L * (attn_w + 3 * h * c["intermediate_size"]) + c["vocab_size"] * h  # + LM head
    causal_attn = 6 * L * seq * c["num_attention_heads"] * d  # 12 * L * s * heads*d / 2 (causal)
    return 6 * n + causal_attn


def timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ours(cfg: dict, mb: int, seq: int, dtype: str, recompute: str, steps: int, warmup: int) -> tuple[float, float]:
    from uniapl_megatron.data.packing import pack_sequences
    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.models.arch import Qwen3Arch
    from uniapl_megatron.models.qwen3 import ModelConfig
    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.trainer.student import MicroBatch, OptimConfig, Student

    par = ParallelConfig()
    init_distributed(par)
    arch = Qwen3Arch.from_hf_dict({"model_type": "qwen3", **cfg})
    student = Student(arch, par, ModelConfig(dtype=dtype, recompute=recompute), OptimConfig(lr=1e-5))
    g = torch.Generator().manual_seed(0)
    packed = pack_sequences([torch.randint(0, cfg["vocab_size"], (seq,), generator=g).tolist() for _ in range(mb)],
                            [1] * mb)
    if torch.cuda.is_available():
        packed = packed.to("cuda")
    batch = [MicroBatch(packed, {})]
    n_tok = packed.loss_mask.sum()

    def loss_fn(m, out):
        loss = -(out * m.packed.loss_mask[0]).sum() / n_tok
        return loss, {"loss": loss.detach()}

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sec = timed(lambda: student.train_step(batch, loss_fn), steps, warmup)
    return sec, peak_gb()


def baseline(cfg: dict, mb: int, seq: int, dtype: str, steps: int, warmup: int) -> tuple[float, float]:
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
    sec = timed(step, steps, warmup)
    return sec, peak_gb()


def main() -> None:
    import subprocess
    import sys

    on_gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="0.6b" if on_gpu else "cpu", choices=sorted(SHAPES))
    ap.add_argument("--mb", type=int, default=8 if on_gpu else 2)
    ap.add_argument("--seq", type=int, default=2048 if on_gpu else 256)
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--steps", type=int, default=5 if on_gpu else 3)
    ap.add_argument("--warmup", type=int, default=2 if on_gpu else 1)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--part", choices=["ours", "baseline"], help="(internal) run one side in this process")
    a = ap.parse_args()
    cfg, dtype = SHAPES[a.shape], "bf16" if on_gpu else "fp32"
    if a.part:  # each side in its own process: peak memory is its own
        fn = ours if a.part == "ours" else baseline
        args = (cfg, a.mb, a.seq, dtype, a.recompute, a.steps, a.warmup) if a.part == "ours" else \
            (cfg, a.mb, a.seq, dtype, a.steps, a.warmup)
        sec, peak = fn(*args)
        print(json.dumps({"sec": sec, "peak": peak}))
        return
    common = [sys.executable, __file__, "--shape", a.shape, "--mb", str(a.mb), "--seq", str(a.seq), "--recompute",
              a.recompute, "--steps", str(a.steps), "--warmup", str(a.warmup)]
    res = {}
    for part in (["ours"] if a.skip_baseline else ["baseline", "ours"]):
        out = subprocess.run([*common, "--part", part], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{part} failed")
        res[part] = json.loads(out.stdout.strip().splitlines()[-1])
    b = res.get("baseline", {"sec": float("nan"), "peak": float("nan")})
    o = res["ours"]
    tokens, fpt = a.mb * a.seq, flops_per_token(cfg, a.seq)
    device = torch.cuda.get_device_name() if on_gpu else f"cpu ({os.cpu_count()} cores)"
    print(json.dumps({
        "device": device, "shape": a.shape, "micro_batch": a.mb, "seq": a.seq, "dtype": dtype, "recompute": a.recompute,
        "tokens_s": round(tokens / o["sec"], 1), "mfu": round(tokens / o["sec"] * fpt / PEAK_FLOPS, 4) if on_gpu else None,
        "peak_mem_gb": round(o["peak"], 2), "baseline_tokens_s": round(tokens / b["sec"], 1),
        "baseline_mfu": round(tokens / b["sec"] * fpt / PEAK_FLOPS, 4) if on_gpu else None,
        "baseline_peak_mem_gb": round(b["peak"], 2),
    }))


if __name__ == "__main__":
    main()
