"""One cell's stages: train (`uniapl train`), then finish = export -> evaluate -> result.

    python -m uniapl_megatron.sweep.cell finish SWEEP_OUTPUT_DIR CELL_ID

``finish`` is what the local runner starts after training and what a Slurm evaluation job runs. It reads the
cell's cell.json (written by the sweep), checks that training reached its last step, exports that checkpoint to
Hugging Face format (tools/convert_hf.py export), runs the sweep's evaluators on it and writes the cell's result
file, atomically and last: a cell is finished exactly when its result file exists.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..eval.io import atomic_write_json
from .spec import ROOT, Cell, SweepError, SweepSpec, cell_dir, run_overrides

CURVE_METRICS = ("eval/heldout_reward", "reward/mean")


def result_path(out: Path, cell_id: str, warmup: bool) -> Path:
    """results/<cell>.json (the table's input); a warm-up's result stays in its cell folder."""
    return cell_dir(out, cell_id) / "result.json" if warmup else out / "results" / f"{cell_id}.json"


def train_command(cell: Cell, out: Path) -> list[str]:
    return [sys.executable, "-m", "uniapl_megatron.cli", "train", str(cell.base), *run_overrides(cell, out)]


def finish_command(out: Path, cell_id: str) -> list[str]:
    return [sys.executable, "-m", "uniapl_megatron.sweep.cell", "finish", str(out), cell_id]


def write_cell_json(spec: SweepSpec, cell: Cell, out: Path, cfg: Any, config_hash: str, commit: str) -> Path:
    """What the finish stage (possibly another job, later) needs to know about the cell."""
    return atomic_write_json(
        cell_dir(out, cell.id) / "cell.json",
        {
            "id": cell.id,
            "label": cell.label,
            "student": cell.student,
            "preset": cell.preset,
            "seed": cell.seed,
            "warmup": cell.preset == "warmup",
            "sweep": spec.name,
            "base": str(cell.base),
            "overrides": run_overrides(cell, out),
            "steps": cfg.train.steps,
            "config_hash": config_hash,
            "git_commit": commit,
            "evaluators": spec.evaluators,
            "keep_checkpoints": spec.keep_checkpoints,
        },
    )


def trained_step(run_dir: Path) -> int | None:
    """The step of the run's latest complete checkpoint, or None."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    state = run_dir / "checkpoints" / Path(latest.read_text().strip()).name / "trainer_state.json"
    try:
        return int(json.loads(state.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def curve(run_dir: Path) -> dict[str, list[list[float]]]:
    """{metric: [[step, value], ...]} of the run's metrics.jsonl for the learning-curve plots."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {m: [[r["step"], r[m]] for r in rows if m in r] for m in CURVE_METRICS if any(m in r for r in rows)}


def _export(cell: dict[str, Any], folder: Path, step: int) -> Path:
    """The checkpoint of ``step`` in Hugging Face format (reused when an earlier attempt exported it)."""
    hf, marker = folder / "hf", folder / "export.json"
    if (hf / "config.json").is_file() and marker.is_file() and json.loads(marker.read_text()).get("step") == step:
        return hf
    ckpt = folder / "run" / "checkpoints" / f"step_{step:06d}"
    cmd = [
        sys.executable,
        "-m",
        "uniapl_megatron.convert.cli",
        "export",
        "--mcore",
        str(ckpt),
        "--out",
        str(hf),
        "--force",
    ]
    print(f"[{cell['label']}] export: {' '.join(cmd[1:])}", flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    if rc != 0:
        raise SweepError(f"cell {cell['label']}: exporting {ckpt} failed (exit {rc})")
    atomic_write_json(marker, {"step": step, "checkpoint": str(ckpt)})
    return hf


def finish(out: Path, cell_id: str) -> Path:
    """Export, evaluate, write the result; returns the result file."""
    from ..trainer.config import load_config
    from .evaluators import EvalContext, build_evaluator

    folder = cell_dir(out, cell_id)
    cell = json.loads((folder / "cell.json").read_text())
    step = trained_step(folder / "run")
    if step != cell["steps"]:
        raise SweepError(
            f"cell {cell['label']}: training ended at step {step or 0} of {cell['steps']} (see {folder / 'train.log'})"
        )
    cfg = load_config(cell["base"], cell["overrides"])
    hf = _export(cell, folder, step)
    records = []
    for name, options in cell["evaluators"].items():
        t0 = time.perf_counter()
        evaluator = build_evaluator(name, options)
        got = evaluator.evaluate(EvalContext(cell, hf, cfg, folder / "eval" / name))
        print(
            f"[{cell['label']}] {name}: {evaluator.benchmark} = {got.score:.4f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        records.append(
            {
                "algorithm": cell["preset"],
                "student": cell["student"],
                "benchmark": evaluator.benchmark,
                "score": got.score,
                "seed": cell["seed"],
                "evaluator": name,
                "metrics": got.metrics,
            }
        )
    summary_file = folder / "run" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    common = {
        "cell": cell["id"],
        "sweep": cell["sweep"],
        "config_hash": cell["config_hash"],
        "git_commit": cell["git_commit"],
        "steps": step,
        "overrides": cell["overrides"],
        "train": {k: v for k, v in summary.items() if k not in ("plot", "log")},
        "curve": curve(folder / "run"),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = atomic_write_json(result_path(out, cell_id, cell["warmup"]), [{**r, **common} for r in records])
    if not cell["keep_checkpoints"]:
        shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)
        if not cell["warmup"]:  # the cells of its student start from a warm-up's export
            shutil.rmtree(hf, ignore_errors=True)
            (folder / "export.json").unlink(missing_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "finish":
        print("usage: python -m uniapl_megatron.sweep.cell finish SWEEP_OUTPUT_DIR CELL_ID", file=sys.stderr)
        return 2
    try:
        path = finish(Path(argv[1]), argv[2])
    except (SweepError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"result": str(path)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
