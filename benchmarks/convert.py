"""Import and export of a Qwen3-0.6B-shaped random checkpoint (bf16, ~1.2 GB): MB/s and peak RSS.

Each conversion runs in a fresh process (as the CLI does); its time is measured inside the process
(Python/megatron start-up excluded, reported separately) and its peak RSS by wait4(). Each direction runs
``--repeats`` times and the median is reported, with every run listed: on a small VM the first touch of
page-cache memory makes single runs vary by +-20%.
Prints one JSON line last: import_mb_s, export_mb_s, peak_rss_mb, checkpoint_mb (+ details).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import OthersCpu, machine

from uniapl_megatron.plan_memory import KNOWN_SHAPES

QWEN3_0P6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    **KNOWN_SHAPES["Qwen/Qwen3-0.6B"],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "torch_dtype": "bfloat16",
    "attention_bias": False,
    "hidden_act": "silu",
}


def make_checkpoint(folder: Path, cfg: dict) -> None:
    import torch
    from safetensors.torch import save_file

    from uniapl_megatron.convert.mapping import expected_hf_shapes
    from uniapl_megatron.models.arch import Qwen3Arch

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    shapes = expected_hf_shapes(Qwen3Arch.from_hf_dict(cfg))
    # Two shards plus an index, as real releases are laid out.
    names = sorted(shapes)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        save_file(
            {n: (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16) for n in part},
            folder / f"model-{i + 1:05d}-of-00002.safetensors",
        )
    weight_map = {n: f"model-{1 if n in names[: len(names) // 2] else 2:05d}-of-00002.safetensors" for n in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def child(direction: str, src: str, dst: str) -> None:
    """One conversion in this process; prints its own timing."""
    from uniapl_megatron.convert import checkpoint
    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.parallel import ParallelConfig

    par = ParallelConfig()
    init_distributed(par)
    t0 = time.perf_counter()
    if direction == "import":
        checkpoint.import_hf(src, dst, par, "bf16")
    else:
        checkpoint.export_hf(src, dst, par)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def run_child(direction: str, src: Path, dst: Path) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, __file__, "--child", direction, str(src), str(dst)],
        stdout=subprocess.PIPE,
        env={**os.environ, "MASTER_PORT": "29731"},
    )
    out = p.stdout.read().decode()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"{direction} failed with status {status}")
    seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
    return seconds, usage.ru_maxrss / 1024, time.perf_counter() - t0


def write_ceiling_mb_s(folder: Path, nbytes: int) -> float:
    """This machine's plain write speed for the same amount of data: bytes already in memory, written in
    64 MB calls to a new file in the same folder and fsynced. No conversion can write faster."""
    import numpy as np

    data = np.random.default_rng(0).integers(0, 255, size=nbytes, dtype=np.uint8)
    path, step = folder / "ceiling.bin", 64 * 2**20
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for i in range(0, nbytes, step):
            f.write(memoryview(data[i : i + step]))
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return nbytes / 1e6 / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeats", type=int, default=3, help="runs per direction; the median is reported")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        make_checkpoint(tmp / "hf", QWEN3_0P6B)
        mb = sum(f.stat().st_size for f in (tmp / "hf").glob("*.safetensors")) / 1e6
        runs: dict[str, list[tuple[float, float, float]]] = {"import": [], "export": []}
        ceiling = []
        meter = OthersCpu()
        for i in range(args.repeats):
            ceiling.append(write_ceiling_mb_s(tmp, int(mb * 1e6)))
            # Keep the first import as export's source; later outputs are removed so every run writes
            # into the same amount of free page cache.
            runs["import"].append(run_child("import", tmp / "hf", tmp / f"mcore{i}"))
            runs["export"].append(run_child("export", tmp / "mcore0", tmp / "hf_out"))
            shutil.rmtree(tmp / "hf_out")
            if i:
                shutil.rmtree(tmp / f"mcore{i}")
        med = {d: statistics.median(r[0] for r in rs) for d, rs in runs.items()}
        rss = {d: max(r[1] for r in rs) for d, rs in runs.items()}
        print(
            json.dumps(
                {
                    "import_mb_s": round(mb / med["import"], 1),
                    "export_mb_s": round(mb / med["export"], 1),
                    "peak_rss_mb": round(max(rss.values()), 1),
                    "checkpoint_mb": round(mb, 1),
                    "import_peak_rss_mb": round(rss["import"], 1),
                    "export_peak_rss_mb": round(rss["export"], 1),
                    "import_runs_mb_s": [round(mb / r[0], 1) for r in runs["import"]],
                    "export_runs_mb_s": [round(mb / r[0], 1) for r in runs["export"]],
                    "write_ceiling_runs_mb_s": [round(c, 1) for c in ceiling],
                    "import_wall_s_with_startup": round(statistics.median(r[2] for r in runs["import"]), 1),
                    "export_wall_s_with_startup": round(statistics.median(r[2] for r in runs["export"]), 1),
                    "others_cpu": meter.share(),
                    "settings": {
                        "checkpoint": "Qwen3-0.6B shape, bf16, random",
                        "repeats": args.repeats,
                        "timed": "inside each fresh process, start-up excluded; median per direction",
                    },
                    "machine": machine(),
                    "date": time.strftime("%Y-%m-%d"),
                }
            )
        )


if __name__ == "__main__":
    main()
