"""Run N local ranks of a command (gloo on CPU, or one GPU each) without torchrun's noise.

Used by the CLIs when a layout needs several processes and none were launched for them, and by tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_launcher() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def run_ranks(argv: Sequence[str], nprocs: int, env: dict[str, str] | None = None, timeout: float | None = None) -> int:
    """Start ``nprocs`` copies of ``argv`` with torchrun-style variables; return the first non-zero exit
    code (stopping the others), or 0. Rank 0 keeps the terminal; the others' output is prefixed.
    A MASTER_PORT already set is kept (a disaggregated rollout server finds the trainer through it)."""
    port = (env or {}).get("MASTER_PORT") or os.environ.get("MASTER_PORT") or str(free_port())
    procs = []
    for rank in range(nprocs):
        penv = {
            **os.environ,
            **(env or {}),
            "RANK": str(rank),
            "WORLD_SIZE": str(nprocs),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nprocs),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs))),
        }
        procs.append(subprocess.Popen(list(argv), env=penv))
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [c for c in codes if c not in (None, 0)]
            if bad:
                return bad[0]
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"error: ranks still running after {timeout:.0f} s; stopped", file=sys.stderr)
                return 124
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
