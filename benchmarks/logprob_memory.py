"""Peak memory and time of the trainer's vocab-parallel log-prob pass against full logits, same batch (fwd + bwd).

Vocabulary 151,936 (Qwen3), hidden 1024 (Qwen3-0.6B; --hidden 128 is the vs_trl.py model), 4,096 target tokens
(16,384 on a GPU), fp32, gradients for hidden and weight. The baseline is the plain one-expression way,
``log_softmax(hidden @ weight.t()).gather(...)``; ours runs at the trainer's default ``optim.chunk_tokens`` unless
--chunk says otherwise. Each variant runs in a fresh process (the variants alternate, --repeats times each); a
variant's peak is its process's peak RSS above the RSS once its inputs exist (both have the same inputs and the
same weight gradient); on a GPU, the peak of allocated memory above the inputs. Seconds are wall and CPU seconds
of one pass; CPU seconds depend less on other load, and `others_cpu` says how much there was. One JSON line last:
chunked_peak_mb, full_logits_peak_mb, ratio, the seconds, the settings, the largest log-prob and gradient
differences, others_cpu (the largest share of the machine other processes used while a pass was timed; each
pass's under others_cpu_by_variant). On a GPU each process runs one untimed pass before the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _machine import OthersCpu, machine

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

V = 151936
BASELINE = "torch.log_softmax(hidden @ weight.t(), -1).gather(1, labels[:, None])[:, 0]"


def _rss_mb(key: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return 0.0


def _pass(variant: str, hidden, weight, labels, chunk: int):
    """One forward and backward of a variant; its log-probs."""
    import torch

    if variant == "full":
        lp = torch.log_softmax(hidden @ weight.t(), -1).gather(1, labels[:, None])[:, 0]
    else:
        from uniapl_megatron.trainer.logprobs import vocab_parallel_logprobs

        lp = vocab_parallel_logprobs(hidden, weight, labels, true_vocab=V, chunk_tokens=chunk)
    lp.sum().backward()
    return lp


def child(variant: str, chunk: int, threads: int, n: int, h: int) -> None:
    import torch

    torch.set_num_threads(threads)
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    g = torch.Generator(dev).manual_seed(0)
    # in place, so that no temporary raises the peak before the measured part starts
    hidden = torch.randn(n, h, generator=g, device=dev).mul_(0.5).requires_grad_()
    weight = torch.randn(V, h, generator=g, device=dev).mul_(0.02).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g, device=dev)
    if gpu:  # one untimed pass first: CUDA context, cuBLAS workspaces and kernel loading are not the variant's cost
        _pass(variant, hidden, weight, labels, chunk)
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20 if gpu else _rss_mb()
    meter, t0, c0 = OthersCpu(), time.perf_counter(), time.process_time()
    lp = _pass(variant, hidden, weight, labels, chunk)
    if gpu:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(
        json.dumps(
            {
                "peak_mb": peak - base,
                "seconds": wall,
                "cpu_seconds": cpu,
                "others_cpu": meter.share(),
                "sums": [float(x.double().sum()) for x in (lp.detach(), hidden.grad, weight.grad)],
                "abs_sums": [float(x.double().abs().sum()) for x in (hidden.grad, weight.grad)],
            }
        )
    )


def run(variant: str, chunk: int, threads: int, n: int, h: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--chunk",
        str(chunk),
        "--threads",
        str(threads),
        "--tokens",
        str(n),
        "--hidden",
        str(h),
    ]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(runs: dict[str, list[dict]], a: argparse.Namespace) -> dict:
    """The printed result: medians per variant, the two variants' agreement, and the settings they ran under."""
    import torch

    from uniapl_megatron.trainer import logprobs

    med = {
        v: {k: statistics.median(r[k] for r in rs) for k in ("peak_mb", "seconds", "cpu_seconds")}
        for v, rs in runs.items()
    }
    full, ours = runs["full"][0], runs["chunked"][0]
    diff = [abs(x - y) for x, y in zip(full["sums"], ours["sums"])]
    return {
        "chunked_peak_mb": round(med["chunked"]["peak_mb"], 1),
        "full_logits_peak_mb": round(med["full"]["peak_mb"], 1),
        "ratio": round(med["full"]["peak_mb"] / max(med["chunked"]["peak_mb"], 1e-9), 2),
        "chunked_seconds": round(med["chunked"]["seconds"], 2),
        "full_logits_seconds": round(med["full"]["seconds"], 2),
        "chunked_cpu_seconds": round(med["chunked"]["cpu_seconds"], 2),
        "full_logits_cpu_seconds": round(med["full"]["cpu_seconds"], 2),
        "others_cpu": max((x for rs in runs.values() for r in rs if (x := r["others_cpu"]) is not None), default=None),
        "others_cpu_by_variant": {v: [r["others_cpu"] for r in rs] for v, rs in runs.items()},
        "logprob_sum_diff": diff[0],
        "grad_rel_diff": [d / max(s, 1e-30) for d, s in zip(diff[1:], full["abs_sums"])],
        "settings": {
            "tokens": a.tokens,
            "vocab": V,
            "hidden": a.hidden,
            "dtype": "fp32",
            "grads": "hidden and weight",
            "chunk_tokens": a.chunk,
            "block_values": (logprobs._BLOCK_VALUES_GPU if torch.cuda.is_available() else logprobs._BLOCK_VALUES),
            "threads": a.threads,
            "repeats": a.repeats,
            "baseline": BASELINE,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "peak": "peak allocated CUDA memory" if torch.cuda.is_available() else "peak RSS above the inputs' RSS",
        },
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    import torch

    from uniapl_megatron.trainer.optim import OptimConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--chunk",
        type=int,
        default=OptimConfig().chunk_tokens,
        help="tokens per block of ours (default: the trainer's optim.chunk_tokens)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16384 if torch.cuda.is_available() else 4096)
    ap.add_argument("--hidden", type=int, default=1024, help="1024: Qwen3-0.6B; 128: the vs_trl.py model")
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per variant, alternating; medians")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.chunk, a.threads, a.tokens, a.hidden)
        return
    runs: dict[str, list[dict]] = {"full": [], "chunked": []}
    for _ in range(a.repeats):
        for variant, done in runs.items():
            done.append(run(variant, a.chunk, a.threads, a.tokens, a.hidden))
    print(json.dumps(summary(runs, a)))


if __name__ == "__main__":
    main()
