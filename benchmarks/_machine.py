"""What every benchmark's JSON line says about where it ran: the machine, and how busy other processes kept it.

``others_cpu`` is the share of the whole machine's CPU time (0 = idle apart from us, 1 = every core busy with
someone else) that processes other than this one and its finished children used while a part was timed. Well above
0 the timings were taken under load and are not comparable: on 2 cores a competing process slows a 2-thread step
2-6x. Memory figures (peak RSS) do not depend on it.
"""

from __future__ import annotations

import os
import platform
import time


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds every process has used, this process's and its waited-for children's), Linux only."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user..steal, less idle and iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


class OthersCpu:
    """Started on creation; ``share()`` is others' share of the machine's CPU time since then (None off Linux).

    A child process counts as ours once it has been waited for (subprocess.run); one still running, or one that
    was never reaped, counts as someone else."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), _cpu_seconds()

    def share(self) -> float | None:
        c1, wall = _cpu_seconds(), time.perf_counter() - self.t0
        if self.c0 is None or c1 is None or wall <= 0:
            return None
        others = (c1[0] - self.c0[0]) - (c1[1] - self.c0[1])
        return round(min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1)))), 3)


def machine() -> str:
    """One line: CPU model and cores, memory, GPU if one is visible."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        mem = "RAM unknown"
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem}{gpu}"
