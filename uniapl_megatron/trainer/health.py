"""Run health: a heartbeat per rank and a hang watchdog that leaves forensics and exits for a requeue.

Every rank keeps ``<output_dir>/health/rank<N>.json`` up to date (written aside and renamed)::

    {"rank": 3, "pid": 4242, "host": "gpu017", "phase": "train", "step": 41, "time": ..., "progress": ...,
     "alive": ..., "waiting_in": null}

``phase`` / ``step`` / ``time`` change when the trainer enters a phase (one small file write);
``progress`` is the last advance (a phase change, or :meth:`Health.tick` inside a long phase); ``alive``
is refreshed by the rank's watchdog thread every poll, and ``waiting_in`` names the torch.distributed call
the main thread is blocked in, once it has not advanced for a poll (read from its Python stack).

When no rank has advanced for ``hang_timeout_s``, every live rank's watchdog dumps all its threads'
Python stacks to ``health/stack_rank<N>.txt``; the lowest live rank writes ``health/hang_report.json``
with ``missing``: the ranks that did not arrive, each with its last phase and step and why (its process
is stopped or gone or silent, or it is busy outside any collective while the others wait in one); then
each rank kills its own child processes and exits with :data:`HANG_EXIT_CODE`, which slurm/_launch.sh
turns into a requeue. The watchdog is a thread, so it runs while the main thread waits in a collective
(those release the GIL); a rank that cannot run it at all (stopped, or a C call holding the GIL) is seen
by the others through its stale ``alive``, and dumps its own stack through faulthandler's C-level timer,
re-armed by the watchdog at every poll. Files only: it works across nodes on the shared output folder,
without any collective, with one rank SIGSTOPped.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

PHASES = ("init", "rollout", "score", "logprobs", "train", "sync", "save", "eval")
HANG_EXIT_CODE = 75  # EX_TEMPFAIL: try again later (slurm/_launch.sh requeues on a hang report)
PG_TIMEOUT_S = 1800.0  # distributed.init_distributed's process-group timeout (30 minutes)
REPORT = "hang_report.json"
EXIT = "exit.json"
# Frames of these files mean the main thread waits for other ranks.
_COLLECTIVE_FILES = ("torch/distributed/", "megatron/core/pipeline_parallel/p2p_communication.py")


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def process_state(pid: int) -> str | None:
    """This host's view of a process: 'stopped', 'zombie', 'running', 'gone'; None if unknowable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    except OSError:
        return None
    state = stat.rsplit(")", 1)[1].split()[0]
    return {"T": "stopped", "t": "stopped", "Z": "zombie", "X": "gone"}.get(state, "running")


class Health:
    """This rank's heartbeat and watchdog. ``phase()`` is called by the trainer at each phase."""

    def __init__(
        self, output_dir: str | Path, rank: int, world_size: int, hang_timeout_s: float, poll_s: float | None = None
    ) -> None:
        self.dir = Path(output_dir) / "health"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world, self.timeout = rank, world_size, hang_timeout_s
        self.poll = poll_s or min(10.0, max(0.5, hang_timeout_s / 10))
        self.stale_s = 3 * self.poll + 2.0  # an `alive` older than this: the rank's watchdog cannot run
        self.path = self.dir / f"rank{rank}.json"
        self._main = threading.main_thread().ident
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stack_file: TextIO | None = None
        now = time.time()
        self._state: dict[str, Any] = {
            "rank": rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "phase": "init",
            "step": 0,
            "time": now,
            "progress": now,
            "alive": now,
            "waiting_in": None,
        }
        if rank == 0 and (self.dir / REPORT).is_file():  # an earlier run's report stays, under another name
            old = self.dir / REPORT
            os.replace(old, self.dir / f"hang_report.{int(old.stat().st_mtime)}.json")
        self._write()

    # ---- the trainer's side -------------------------------------------------------------------------

    def phase(self, name: str, step: int) -> None:
        """Entering ``name`` (one of PHASES) of ``step``: one small atomic file write."""
        now = time.time()
        with self._lock:
            self._state.update(phase=name, step=step, time=now, progress=now, alive=now, waiting_in=None)
            self._write()

    def tick(self) -> None:
        """Progress inside a long phase (no write; the next heartbeat carries it)."""
        self._state["progress"] = time.time()

    def start(self) -> None:
        if self.timeout > 0 and self._thread is None:
            self._stack_file = open(self.dir / f"stack_rank{self.rank}.txt", "w")  # noqa: SIM115 - kept for dumps
            self._arm()
            self._thread = threading.Thread(target=self._watch, name="uniapl-health", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.poll)
            self._thread = None
        if self._stack_file is not None:
            faulthandler.cancel_dump_traceback_later()
            self._stack_file.close()
            self._stack_file = None

    def exit(self, reason: str, step: int) -> None:
        """Rank 0 records why the run ended (finished, signal, deadline); the launcher requeues on deadline."""
        if self.rank == 0:
            _atomic_json(self.dir / EXIT, {"reason": reason, "step": step, "time": time.time()})

    # ---- the watchdog -------------------------------------------------------------------------------

    def _write(self) -> None:
        _atomic_json(self.path, self._state)

    def _waiting_in(self) -> str | None:
        """The outermost torch.distributed (or Megatron p2p) function the main thread is inside, if any."""
        frame = sys._current_frames().get(self._main)
        found = None
        while frame is not None:
            code = frame.f_code
            if code.co_name != "wrapper" and any(f in code.co_filename.replace("\\", "/") for f in _COLLECTIVE_FILES):
                found = code.co_name
            frame = frame.f_back
        return found

    def _arm(self) -> None:
        """faulthandler's own C thread dumps this rank's stacks if this thread gets no chance to run that long."""
        faulthandler.dump_traceback_later(max(self.timeout, 3 * self.poll), file=self._stack_file)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            self._arm()
            now = time.time()
            idle = now - self._state["progress"]
            with self._lock:
                self._state.update(alive=now, waiting_in=self._waiting_in() if idle >= self.poll else None)
                self._write()
            if idle < self.timeout:
                continue
            view = {r: _read(self.dir / f"rank{r}.json") for r in range(self.world)}
            if any(v and now - v.get("progress", 0) < self.timeout for v in view.values()):
                continue  # another rank advanced: this one waits for it
            self._on_hang(view, now)

    def _on_hang(self, view: dict[int, dict | None], now: float) -> None:
        faulthandler.cancel_dump_traceback_later()
        f = self._stack_file
        if f is not None:
            f.write(
                f"rank {self.rank} (pid {os.getpid()}): no rank advanced for {self.timeout:.0f} s; "
                f"this rank is in phase {self._state['phase']} of step {self._state['step']}\n"
            )
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.flush()
        live = [r for r, v in view.items() if v and now - v.get("alive", 0) <= self.stale_s]
        if self.rank == min(live, default=self.rank):
            self._report(view, now)
        log.error(
            "hang: no rank advanced for %.0f s; see %s; exiting with %d",
            self.timeout,
            self.dir / REPORT,
            HANG_EXIT_CODE,
        )
        # Give the other ranks' watchdogs a poll to dump their stacks before the launcher stops them.
        time.sleep(min(2 * self.poll, 20.0))
        _kill_children()
        os._exit(HANG_EXIT_CODE)

    def _why(self, v: dict | None, now: float) -> str | None:
        """Why a rank did not arrive, or None when it is waiting in a collective like the others."""
        if v is None:
            return "no heartbeat file: the rank never started its trainer"
        if now - v.get("alive", 0) > self.stale_s:
            state = process_state(v["pid"]) if v.get("host") == socket.gethostname() else None
            return {
                "stopped": "its process is stopped (SIGSTOP / SIGTSTP)",
                "gone": "its process has exited",
                "zombie": "its process has exited",
            }.get(
                state or "",
                f"silent for {now - v.get('alive', 0):.0f} s: its process is stopped, gone, or holds "
                f"the GIL in a C call (its stack, if dumped, is in stack_rank{v['rank']}.txt)",
            )
        if not v.get("waiting_in"):
            return f"busy outside any collective in phase {v.get('phase')} (see stack_rank{v['rank']}.txt)"
        return None

    def _report(self, view: dict[int, dict | None], now: float) -> None:
        missing, ranks = [], []
        for r in range(self.world):
            v = view.get(r)
            why = self._why(v, now)
            if why is not None:
                missing.append(
                    {
                        "rank": r,
                        "phase": v and v.get("phase"),
                        "step": v and v.get("step"),
                        "pid": v and v.get("pid"),
                        "host": v and v.get("host"),
                        "why": why,
                    }
                )
            if v:
                ranks.append(
                    {k: v.get(k) for k in ("rank", "host", "pid", "phase", "step", "waiting_in")}
                    | {
                        "idle_s": round(now - v.get("progress", now), 1),
                        "silent_s": round(now - v.get("alive", now), 1),
                    }
                )
        report = {
            "time": now,
            "hang_timeout_s": self.timeout,
            "world_size": self.world,
            "reported_by": self.rank,
            "missing": missing,
            "ranks": ranks,
            "stacks": {str(r["rank"]): f"stack_rank{r['rank']}.txt" for r in ranks},
        }
        if not missing:
            report["note"] = (
                "every rank waits in a collective: they disagree on which (see waiting_in), or one "
                "collective does not complete"
            )
        tmp = self.dir / f".{REPORT}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        try:
            os.link(tmp, self.dir / REPORT)  # the first report of this hang wins; later ranks' views see the exits
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)


def _kill_children() -> None:
    """This process's descendants (rollout engine, reward workers, checkpoint writers) go with it."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for c in children:
        try:
            c.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=5)
