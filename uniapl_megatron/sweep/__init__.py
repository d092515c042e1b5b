"""`uniapl sweep SWEEP.yaml`: presets x students x seeds over one base config -> the paper-shaped table.

Each cell runs train -> export -> evaluate (spec.py: the file and its cells; cell.py: the stages; runners.py:
local or Slurm; evaluators.py: the registered benchmarks). Results go to <output_dir>/results/<cell>.json (one
record per benchmark, with the cell, its config hash and the git commit), and from them <output_dir>/table.md,
table.csv (mean and standard deviation over seeds, difference to GRPO with its standard error) and
curves/<student>/<preset>.png. Rerunning the command skips finished cells.
"""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .spec import SweepError, SweepSpec, cell_config, config_hash, expand, git_commit, load_spec, output_path

__all__ = ["SweepError", "SweepSpec", "load_spec", "main", "plan"]


def plan(spec: SweepSpec, only: Sequence[str] = ()) -> list[Any]:
    """Every selected cell with its loaded, checked config (refused here, before anything runs, when invalid)."""
    from .runners import Planned

    out = output_path(spec)
    cells = expand(spec, out)
    if only:
        keep = [c for c in cells if c.preset != "warmup" and any(fnmatch.fnmatchcase(c.label, o) for o in only)]
        if not keep:
            raise SweepError(f"--only {' '.join(only)}: matches no cell; cells are named like {cells[-1].label}")
        needed = {c.warmup_of for c in keep}
        cells = [c for c in cells if c.id in needed] + keep
    planned = []
    for c in cells:
        cfg = cell_config(spec, c, out)
        _check_inputs(spec, c, cfg)
        planned.append(Planned(c, cfg, config_hash(cfg, out)))
    return planned


def _check_inputs(spec: SweepSpec, cell: Any, cfg: Any) -> None:
    """The files a cell reads exist (a warm-up's export is made by the sweep itself)."""
    paths = [
        (f"data.{k}", p) for k in ("demo_paths", "prompt_paths", "eval_prompt_paths") for p in getattr(cfg.data, k)
    ]
    if cfg.discriminator is not None and cfg.discriminator.path:
        paths.append(("discriminator.path", cfg.discriminator.path))
    if cell.warmup_of is None:
        paths.append(("model.hf_path", cfg.model.hf_path))
    if cfg.model.load:
        paths.append(("model.load", cfg.model.load))
    missing = [f"{k}={p}" for k, p in paths if p and not Path(p).exists()]
    if missing:
        raise SweepError(f"{spec.source}: cell {cell.label}: missing input(s): {', '.join(missing)}")


def collect(spec: SweepSpec, stream: Any = sys.stdout) -> dict[str, Any] | None:
    """table.md, table.csv and curves/ from <output_dir>/results; None when no cell has finished yet."""
    from ..eval.tables import load_results, write_report

    results = output_path(spec) / "results"
    if not results.is_dir() or not any(results.glob("*.json")):
        print("no finished cell yet: no table", file=stream)
        return None
    report = write_report(load_results([results]), output_path(spec))
    print("\n" + report.pop("table"), file=stream)
    print(
        f"table: {report['markdown']}, {report['csv']}; curves: {len(report['curves'])} plot(s) in "
        f"{output_path(spec) / 'curves'}",
        file=stream,
    )
    return report


def _record_invocation(spec: SweepSpec, argv: Sequence[str], commit: str) -> None:
    """The sweep file and the exact command next to the results (what results/<name>/ commits)."""
    out = output_path(spec)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.source, out / "sweep.yaml")
    with open(out / "command.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  commit {commit}\n  uniapl sweep {shlex.join(argv)}\n")


def _stale(planned: list[Any], out: Path) -> list[str]:
    """Finished cells whose result was made from another config than the one the sweep gives them now."""
    import json

    from .cell import result_path

    stale = []
    for p in planned:
        f = result_path(out, p.cell.id, p.cell.preset == "warmup")
        if f.is_file() and json.loads(f.read_text())[0].get("config_hash") != p.config_hash:
            stale.append(p.cell.label)
    return stale


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .runners import LocalRunner, SlurmRunner

    spec = load_spec(args.sweep)
    if args.collect:
        return 0 if collect(spec) is not None else 1
    planned = plan(spec, args.only)
    out, runner_kind = output_path(spec), args.runner or spec.runner
    commit = git_commit()
    stale = _stale(planned, out)
    print(f"sweep {spec.name}: {len(planned)} cell(s), runner {runner_kind}, output {out}, commit {commit}", flush=True)
    for label in stale:
        print(
            f"  warning: {label}: its result was made with another config (hash differs); it is kept and "
            f"skipped. Delete its results/ file to rerun it.",
            flush=True,
        )
    if args.dry_run:
        return _dry_run(planned, out)
    _record_invocation(spec, argv, commit)
    runner = (SlurmRunner if runner_kind == "slurm" else LocalRunner)(spec, out, commit)
    outcome = runner.run(planned)
    if runner_kind == "slurm":
        if not args.wait:
            print(
                f"submitted; `uniapl sweep {args.sweep} --collect` builds the table once the jobs are done", flush=True
            )
            return 0
        runner.wait(outcome["jobs"])
        from .cell import result_path

        outcome["failed"] = [
            p.cell.id for p in planned if not result_path(out, p.cell.id, p.cell.preset == "warmup").is_file()
        ]
    collect(spec)
    failed = outcome.get("failed", []) + outcome.get("blocked", [])
    if failed:
        print(
            f"{len(failed)} cell(s) did not finish: {', '.join(failed)} (see cells/<cell>/failed.json and logs); "
            "rerun the same command to retry them",
            flush=True,
        )
        return 1
    return 0 if not getattr(runner, "stopped", 0) else 128 + runner.stopped


def _dry_run(planned: list[Any], out: Path) -> int:
    from .cell import finish_command, result_path, train_command

    for p in planned:
        done = result_path(out, p.cell.id, p.cell.preset == "warmup").is_file()
        print(
            f"{p.cell.label}  [{'finished' if done else 'to run'}]  config {p.config_hash}\n"
            f"  train:  {shlex.join(train_command(p.cell, out))}\n"
            f"  finish: {shlex.join(finish_command(out, p.cell.id))}"
        )
    return 0


def parser(prog: str = "uniapl sweep") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return ap


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("sweep", help="the sweep file (YAML; see uniapl_megatron/sweep/spec.py)")
    ap.add_argument("--runner", choices=("local", "slurm"), default=None, help="default: the file's `runner` (local)")
    ap.add_argument(
        "--only",
        nargs="+",
        default=(),
        metavar="PATTERN",
        help="run only cells whose name (student/preset/seedN) matches one of these fnmatch patterns",
    )
    ap.add_argument("--dry-run", action="store_true", help="check every cell's config and print the commands")
    ap.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, then build the table")
    ap.add_argument("--collect", action="store_true", help="only (re)build the table and curves from results/")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        return run(args, argv)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, OSError) as e:  # sbatch / squeue failures, unreadable result files
        print(f"error: {e}", file=sys.stderr)
        return 1
