"""The two ways to run a sweep's cells: here one after another (LocalRunner), or one Slurm job per cell with its
evaluation a second job chained by --dependency=afterok (SlurmRunner). Both skip finished cells (result file
present), so rerunning the same command resumes; a failed cell is reported and the others go on.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .cell import finish_command, result_path, train_command, trained_step, write_cell_json
from .spec import ROOT, Cell, SweepSpec, cell_dir, run_overrides


@dataclass
class Planned:
    cell: Cell
    config: Any  # RunConfig
    config_hash: str

    @property
    def steps(self) -> int:
        return self.config.train.steps


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the sweep dies, even by SIGKILL (the trainer then saves, exits)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Load:
    """The share of the machine's CPU time that processes other than the sweep's used over an interval (Linux;
    None elsewhere): per-cell times measured beside other jobs are not comparable, and this says how much."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float] | None:
        import resource

        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait
        mine = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        return busy, mine.ru_utime + mine.ru_stime + own.ru_utime + own.ru_stime, time.monotonic()

    def others_cpu(self) -> float | None:
        end = self._now()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return round(max(0.0, other) / ((end[2] - self.start[2]) * (os.cpu_count() or 1)), 3)


def _tail(path: Path, n: int = 8) -> str:
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines() if path.is_file() else []
    return "\n".join("      " + line[:200] for line in lines[-n:])


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_result(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())


class LocalRunner:
    """Each cell: `uniapl train` (log: cells/<cell>/train.log), then the finish stage (cells/<cell>/finish.log).

    SIGINT / SIGTERM: the running stage gets SIGTERM (the trainer saves a checkpoint), then the sweep stops;
    the same command resumes. If the sweep itself is killed, its child gets SIGTERM too (PR_SET_PDEATHSIG)."""

    def __init__(self, spec: SweepSpec, out: Path, commit: str, stream: TextIO = sys.stdout) -> None:
        self.spec, self.out, self.commit, self.stream = spec, out, commit, stream
        self.child: subprocess.Popen | None = None
        self.stopped = 0

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopped = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self, planned: list[Planned]) -> dict[str, list[str]]:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        outcome: dict[str, list[str]] = {"done": [], "skipped": [], "failed": [], "blocked": []}
        failed_warmups: set[str] = set()
        todo = [p.cell.id for p in planned if not result_path(self.out, p.cell.id, p.cell.preset == "warmup").is_file()]
        times: list[float] = []
        try:
            for n, p in enumerate(planned, 1):
                tag = f"[{n}/{len(planned)}] {p.cell.label}"
                if p.cell.id not in todo:
                    outcome["skipped"].append(p.cell.id)
                    self.say(f"{tag}: finished earlier ({self._score(p)}), skipped")
                    continue
                if p.cell.warmup_of in failed_warmups:
                    outcome["blocked"].append(p.cell.id)
                    self.say(f"{tag}: not run, its warm-up {p.cell.warmup_of} failed")
                    continue
                t0, load = time.perf_counter(), Load()
                ok = self._cell(p, tag)
                if self.stopped:
                    self.say(f"stopped by signal {self.stopped}; the same command resumes (finished cells are kept)")
                    break
                times.append(time.perf_counter() - t0)
                outcome["done" if ok else "failed"].append(p.cell.id)
                if not ok and p.cell.preset == "warmup":
                    failed_warmups.add(p.cell.id)
                left = len(todo) - todo.index(p.cell.id) - 1
                eta = f", about {_duration(sum(times) / len(times) * left)} for the {left} left" if left else ""
                self.say(
                    f"{tag}: {'done' if ok else 'FAILED'} in {_duration(times[-1])} (others_cpu "
                    f"{load.others_cpu()}){eta}"
                )
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return outcome

    def _score(self, p: Planned) -> str:
        records = read_result(result_path(self.out, p.cell.id, p.cell.preset == "warmup"))
        return ", ".join(f"{r['benchmark']} {r['score']:.3f}" for r in records)

    def _cell(self, p: Planned, tag: str) -> bool:
        folder = cell_dir(self.out, p.cell.id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "failed.json").unlink(missing_ok=True)
        write_cell_json(self.spec, p.cell, self.out, p.config, p.config_hash, self.commit)
        if trained_step(folder / "run") != p.steps:
            self.say(f"{tag}: train ({p.steps} steps; log {folder / 'train.log'})")
            rc = self._stage(train_command(p.cell, self.out), folder / "train.log", p, tag)
            if self.stopped:
                return False
            step = trained_step(folder / "run")
            if rc != 0 or step != p.steps:
                return self._failed(folder, tag, "train", rc, f"training ended at step {step or 0} of {p.steps}")
        summary = self._summary(folder)
        self.say(f"{tag}: trained; held-out reward {summary}; export + evaluate (log {folder / 'finish.log'})")
        rc = self._stage(finish_command(self.out, p.cell.id), folder / "finish.log", None, tag)
        if self.stopped:
            return False
        if rc != 0:
            return self._failed(folder, tag, "finish", rc, "export or evaluation failed")
        self.say(f"{tag}: {self._score(p)}")
        return True

    @staticmethod
    def _summary(folder: Path) -> str:
        f = folder / "run" / "summary.json"
        s = json.loads(f.read_text()) if f.is_file() else {}
        if "heldout_reward_first" not in s:
            return "not measured"
        return f"{s['heldout_reward_first']:.3f} -> {s['heldout_reward_last']:.3f}"

    def _failed(self, folder: Path, tag: str, stage: str, rc: int, why: str) -> bool:
        log = folder / f"{stage}.log"
        from ..eval.io import atomic_write_json

        atomic_write_json(folder / "failed.json", {"stage": stage, "returncode": rc, "why": why, "log": str(log)})
        self.say(f"{tag}: FAILED at {stage} (exit {rc}: {why}); log {log}; its last lines:\n{_tail(log)}")
        return False

    def _stage(self, cmd: list[str], log: Path, p: Planned | None, tag: str) -> int:
        """Run one stage with its output appended to ``log``; a progress bar from metrics.jsonl while training."""
        import tqdm as tqdm_module
        from tqdm import tqdm

        tqdm_module.tqdm.monitor_interval = 0  # no monitor thread: the fork above stays safe
        with open(log, "a") as f:
            f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            f.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            # preexec_fn runs one prctl call; the sweep starts no threads (tqdm's monitor is off, below).
            self.child = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, preexec_fn=_die_with_parent
            )  # noqa: PLW1509
            bar = None
            if p is not None and self.stream.isatty():
                bar = tqdm(total=p.steps, desc=f"  {p.cell.label}", unit="step", leave=False, file=self.stream)
            metrics = log.parent / "run" / "metrics.jsonl"
            while self.child.poll() is None:
                time.sleep(2)
                if bar is not None and metrics.is_file():
                    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
                    bar.n = max([r["step"] for r in rows] or [0])
                    held = [r["eval/heldout_reward"] for r in rows if "eval/heldout_reward" in r]
                    bar.set_postfix({"heldout": f"{held[-1]:.3f}"} if held else {})
            if bar is not None:
                bar.close()
            rc, self.child = self.child.returncode, None
            return rc


class SlurmRunner:
    """Per cell, two jobs: training (slurm.train_script, which sources slurm/_launch.sh) and, chained with
    --dependency=afterok and --kill-on-invalid-dep=yes, the finish stage. A warm-up's finish job gates its
    student's training jobs the same way. Cells finished or with jobs still queued are not submitted again."""

    def __init__(self, spec: SweepSpec, out: Path, commit: str, stream: TextIO = sys.stdout) -> None:
        self.spec, self.out, self.commit, self.stream = spec, out, commit, stream
        self.python = os.environ.get("UNIAPL_PYTHON") or sys.executable

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def run(self, planned: list[Planned]) -> dict[str, list[str]]:
        queued = self.queued()
        gate: dict[str, str] = {}  # warm-up cell -> the job that finishes it
        outcome: dict[str, list[str]] = {"submitted": [], "skipped": [], "queued": []}
        for p in planned:
            folder, warm = cell_dir(self.out, p.cell.id), p.cell.preset == "warmup"
            if result_path(self.out, p.cell.id, warm).is_file():
                outcome["skipped"].append(p.cell.id)
                self.say(f"{p.cell.label}: finished earlier, skipped")
                continue
            jobs = self._jobs(folder)
            if jobs and any(j in queued for j in jobs.values()):
                outcome["queued"].append(p.cell.id)
                gate[p.cell.id] = jobs["finish"]
                self.say(f"{p.cell.label}: jobs {', '.join(jobs.values())} still queued or running, not resubmitted")
                continue
            folder.mkdir(parents=True, exist_ok=True)
            write_cell_json(self.spec, p.cell, self.out, p.config, p.config_hash, self.commit)
            after = [gate[p.cell.warmup_of]] if p.cell.warmup_of in gate else []
            jobs = {}
            if trained_step(folder / "run") != p.steps:
                jobs["train"] = self.sbatch(self._train_args(p, folder), after)
                after = [jobs["train"]]
            jobs["finish"] = self.sbatch(self._finish_args(p, folder), after)
            from ..eval.io import atomic_write_json

            atomic_write_json(folder / "slurm.json", jobs)
            gate[p.cell.id] = jobs["finish"]
            outcome["submitted"].append(p.cell.id)
            self.say(
                f"{p.cell.label}: "
                + ", ".join(f"{k} job {v}" for k, v in jobs.items())
                + (f" (after {', '.join(after)})" if "train" not in jobs and after else "")
            )
        outcome["jobs"] = sorted(set(gate.values()))
        return outcome

    @staticmethod
    def _jobs(folder: Path) -> dict[str, str]:
        f = folder / "slurm.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def _train_args(self, p: Planned, folder: Path) -> list[str]:
        return [
            f"--job-name=uniapl-{p.cell.id}",
            f"--output={folder}/train-%j.out",
            f"--chdir={ROOT}",
            *self.spec.slurm.train_args,
            str(ROOT / self.spec.slurm.train_script),
            str(p.cell.base),
            *run_overrides(p.cell, self.out),
        ]

    def _finish_args(self, p: Planned, folder: Path) -> list[str]:
        cmd = [self.python, *finish_command(self.out, p.cell.id)[1:]]
        return [
            f"--job-name=uniapl-{p.cell.id}-eval",
            f"--output={folder}/finish-%j.out",
            f"--chdir={ROOT}",
            *self.spec.slurm.eval_args,
            "--wrap",
            "exec " + shlex.join(cmd),
        ]

    def sbatch(self, args: list[str], after: list[str]) -> str:
        dep = [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"] if after else []
        env = {**os.environ, "UNIAPL_PYTHON": self.python}
        r = subprocess.run(
            ["sbatch", "--parsable", *dep, *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {shlex.join(args[:4])} ... failed: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout.strip().split(";")[0]

    @staticmethod
    def queued() -> set[str]:
        """Ids of the jobs in Slurm's queue (pending, running, completing)."""
        r = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=60, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"squeue failed: {r.stderr.strip()}")
        return set(r.stdout.split())

    def wait(self, jobs: list[str], poll: float = 5.0) -> None:
        """Until none of ``jobs`` is queued or running; prints what is left when that changes."""
        last = None
        while True:
            left = sorted(set(jobs) & self.queued())
            if not left:
                return
            if left != last:
                self.say(f"[slurm] {len(left)} job(s) queued or running: {' '.join(left)}")
                last = left
            time.sleep(poll)
