"""Peak memory of the chunked vocab-parallel log-prob pass vs a full-logits one, same batch (fwd + bwd).

Vocabulary 151,936 (Qwen3), hidden 1024 (Qwen3-0.6B), 4,096 target tokens, fp32. Each variant runs in a
fresh process; its extra peak RSS over the inputs is reported. One JSON line last:
chunked_peak_mb, full_logits_peak_mb (+ seconds of each and the max log-prob difference).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

V, H, N = 151936, 1024, 4096


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(variant: str, chunk: int) -> None:
    import torch

    torch.manual_seed(0)
    hidden = (torch.randn(N, H) * 0.5).requires_grad_()
    weight = (torch.randn(V, H) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (N,))
    base = _rss_mb()
    t0 = time.perf_counter()
    if variant == "full":
        logits = hidden @ weight.t()
        lp = torch.log_softmax(logits.float(), -1).gather(1, labels[:, None])[:, 0]
    else:
        from uniapl_megatron.trainer.logprobs import vocab_parallel_logprobs

        lp = vocab_parallel_logprobs(hidden, weight, labels, true_vocab=V, chunk_tokens=chunk)
    lp.sum().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak - base, "seconds": seconds, "checksum": float(lp.detach().double().sum())}))


def run(variant: str, chunk: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--chunk", str(chunk)], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child")
    ap.add_argument("--chunk", type=int, default=512)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.chunk)
        return
    full, chunked = run("full", a.chunk), run("chunked", a.chunk)
    print(json.dumps({
        "chunked_peak_mb": round(chunked["peak_mb"], 1), "full_logits_peak_mb": round(full["peak_mb"], 1),
        "ratio": round(full["peak_mb"] / max(chunked["peak_mb"], 1e-9), 2),
        "chunked_seconds": round(chunked["seconds"], 2), "full_logits_seconds": round(full["seconds"], 2),
        "checksum_diff": abs(full["checksum"] - chunked["checksum"]), "tokens": N, "vocab": V, "hidden": H,
        "chunk_tokens": a.chunk, "machine": f"{os.cpu_count()} CPU cores, no GPU",
    }))


if __name__ == "__main__":
    main()
