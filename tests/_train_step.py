"""Runs tests/workers/train_step.py at a layout and reads back what rank 0 wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from uniapl_megatron.launch import run_ranks

WORKER = Path(__file__).resolve().parent / "workers" / "train_step.py"


def train_step(model: Path, out: Path, world: int, *args: str) -> tuple[dict, dict]:
    """(updated HF-named weights, metrics) of the worker's step(s) on ``world`` local ranks."""
    from safetensors.torch import load_file

    code = run_ranks([sys.executable, str(WORKER), "--hf", str(model), "--out", str(out), *args], world, timeout=900)
    assert code == 0, f"worker {args} exited with {code}"
    return load_file(str(out) + ".safetensors"), json.loads(Path(str(out) + ".json").read_text())


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
