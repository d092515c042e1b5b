"""Trainer checkpoints: model + optimizer (Megatron distributed checkpoint), scheduler, data position,
RNG, discriminator, counters. Written aside and renamed; the ``latest`` pointer moves last; keep the last K.

Layout of ``<output_dir>/checkpoints/step_000042/``::

    uniapl_checkpoint.json  + hf/   same as tools/convert_hf.py import writes, so `export` works on it
    model/                          torch_dist: model and optimizer state (see OPTIM_FORMATS)
    trainer_state.json              step, scheduler, sampler, counters, optimizer format, layout
    rng/rank_00000.json             Python / numpy / torch RNG of each rank
    discriminator.pt                online discriminator state (tensors only; loaded weights_only)

How it scales (Megatron's dist-ckpt, as Megatron-LM drives it): every rank writes its own shards, the
replicated ones spread over the data-parallel ranks (FullyParallelSaveStrategyWrapper) and read once per
data-parallel group then exchanged (FullyParallelLoadStrategyWrapper). With ``async_save`` the tensors are
staged to host memory and a forked writer process writes them while training goes on; the folder is renamed
into place and ``latest`` moves only in the finalize step, after every rank's writer has finished. So a
checkpoint folder without the ``.partial`` suffix is always complete, at any moment a process may be killed.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from ..convert.checkpoint import FORMAT, HF_SIDE_FILES, META_NAME
from ..distributed import collective_device
from ..models.arch import ConfigError
from .optim import optimizer_classes

log = logging.getLogger(__name__)

LATEST = "latest"
# fully_reshardable: one tensor per parameter and state (like a plain optimizer's), loadable at any TP / PP / DP;
# saving gathers each data-parallel group's optimizer shards. dp_reshardable: each rank's flat buffers as they
# are, no gather, loadable only at the same TP / PP (Megatron-LM's default).
OPTIM_FORMATS = ("fully_reshardable", "dp_reshardable")
LAYOUT_KEYS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "context_parallel_size",
)


_DEADLINE = 1000  # stop flag above any signal number: the job's end time is near


class Stateful(Protocol):
    """A part whose state a checkpoint holds in trainer_state.json: its keys sit at the top level there, beside
    the student's (``scheduler``) and the checkpoint's own (``step``, ``optimizer_format``, ``layout``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / "trainer_state.json").is_file()


def _delete(path: Path) -> None:
    """Renamed out of the step_* namespace first, so no step_* folder is ever half deleted."""
    trash = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names; if that one is gone (a folder deleted by hand), the newest complete one."""
    ckpts = Path(output_dir) / "checkpoints"
    pointer = ckpts / LATEST
    if not pointer.is_file():
        return None
    path = ckpts / pointer.read_text().strip()
    if _complete(path):
        return path
    done = sorted(p for p in ckpts.glob("step_*") if _complete(p))
    if done:
        log.warning("%s names %s, which is not a complete checkpoint; using %s", pointer, path.name, done[-1].name)
        return done[-1]
    return None


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": repr(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _layout(student: Any) -> dict[str, Any]:
    return {k: getattr(student.parallel, k, None) for k in LAYOUT_KEYS}


def _dp_group() -> Any:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


class Checkpointer:
    """Saves (optionally async) and loads trainer checkpoints under ``<output_dir>/checkpoints``.

    Every method is collective: all ranks call it at the same point. An async save completes in
    :meth:`maybe_finalize` (call it once per step), in the next :meth:`save`, or in :meth:`finalize`.
    """

    def __init__(
        self,
        output_dir: str | Path,
        async_save: bool = True,
        fully_parallel: bool = True,
        optim_format: str = "fully_reshardable",
        keep_last: int = 2,
        save_every: int = 0,
        deadline: SaveDeadline | None = None,
        on_save: Callable[[int], None] | None = None,
    ) -> None:
        if optim_format not in OPTIM_FORMATS:
            raise ConfigError(f"train.ckpt_optim_format={optim_format!r}: expected one of {', '.join(OPTIM_FORMATS)}")
        self.dir = Path(output_dir) / "checkpoints"
        self.async_save, self.fully_parallel = async_save, fully_parallel
        self.optim_format, self.keep_last = optim_format, keep_last
        self.save_every = save_every  # 0: only at the last step and on a stop
        self.deadline = deadline or SaveDeadline(None, 0.0)
        self.on_save = on_save  # told the step before a save starts (the run's health phase)
        self.last_saved_step: int | None = None
        self._signal = 0
        self._queue: Any = None
        self._strategy: Any = None
        self._pending: tuple[int, float] | None = None  # (step, start time) of the save being written
        self.last_save_seconds: float | None = None  # start of the last save until it was complete
        self.last_blocking_seconds: float | None = None  # how long the last save held training up

    # ---- save ---------------------------------------------------------------------------------------

    def _save_strategy(self) -> Any:
        if self._strategy is None:
            from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
            from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

            self._strategy = get_default_save_sharded_strategy()
            if self.fully_parallel:
                # The state's structure is the same at every save: the distribution is computed once.
                self._strategy = FullyParallelSaveStrategyWrapper(
                    self._strategy, _dp_group(), do_cache_distribution=True
                )
        return self._strategy

    def save(
        self,
        step: int,
        student: Any,
        states: Sequence[Stateful] = (),
        hf_dir: str | None = None,
        discriminator: Any = None,
        block: bool = False,
    ) -> Path:
        """Write checkpoint ``step`` of ``student`` and ``states``; returns its final path (complete once
        finalized). ``hf_dir``: the model's HF folder, whose tokenizer and config files go along. ``block`` waits
        until it is complete."""
        from megatron.core import dist_checkpointing

        self.finalize()  # one save at a time: the previous one completes (and moves `latest`) first
        t0 = time.perf_counter()
        name = f"step_{step:06d}"
        final, tmp = self.dir / name, self.dir / f".{name}.partial"
        if _rank() == 0:
            for left in self.dir.glob(".step_*"):  # a killed run's unfinished or half-deleted folders
                shutil.rmtree(left, ignore_errors=True)
            (tmp / "model").mkdir(parents=True)
            (tmp / "rng").mkdir()
        _barrier()
        request = dist_checkpointing.save(
            student.sharded_state_dict(self.optim_format),
            str(tmp / "model"),
            self._save_strategy(),
            async_sharded_save=self.async_save,
        )
        _write_json(tmp / "rng" / f"rank_{_rank():05d}.json", _rng_state())
        if _rank() == 0:
            state = _merged(student, states)
            meta = {**student.checkpoint_meta(), "source": hf_dir, "step": step}
            self._write_side_files(tmp, step, state, meta, hf_dir, discriminator, student)
        commit = partial(self._commit, tmp, final)
        self._pending = (step, t0)
        if request is None:
            _barrier()
            commit()
            self._done()
        else:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            if self._queue is None:
                self._queue = AsyncCallsQueue()
            request.add_finalize_fn(commit)
            request.add_finalize_fn(self._done)
            self._queue.schedule_async_request(request)
        self.last_blocking_seconds = time.perf_counter() - t0
        self.last_saved_step = step
        if block:
            self.finalize()
        return final

    def _write_side_files(
        self,
        tmp: Path,
        step: int,
        state: dict[str, Any],
        meta: dict[str, Any],
        hf_dir: str | None,
        discriminator: Any,
        student: Any,
    ) -> None:
        if discriminator is not None and discriminator.trainable:  # a frozen one's weights are its folder's
            torch.save(discriminator.state_dict(), tmp / "discriminator.pt")
        (tmp / "hf").mkdir()
        for f in HF_SIDE_FILES:
            if hf_dir and (Path(hf_dir) / f).is_file():
                shutil.copy2(Path(hf_dir) / f, tmp / "hf" / f)
        _write_json(tmp / META_NAME, {"format": FORMAT, **meta})
        _write_json(
            tmp / "trainer_state.json",
            {"step": step, "optimizer_format": self.optim_format, "layout": _layout(student), **state},
        )

    def _commit(self, tmp: Path, final: Path) -> None:
        """Rank 0, once every rank's shards are written: rename into place, move ``latest``, prune."""
        if _rank() != 0:
            return
        if final.exists():  # the same step saved again (after a resume)
            _delete(final)
        os.replace(tmp, final)
        pointer = self.dir / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, self.dir / LATEST)  # the pointer moves only once the checkpoint is whole
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for old in done[: -self.keep_last] if self.keep_last > 0 else []:
            if old != final:
                _delete(old)

    def _done(self) -> None:
        if self._pending is not None:
            self.last_save_seconds = time.perf_counter() - self._pending[1]
            self._pending = None

    @property
    def pending_step(self) -> int | None:
        """The step of a save still being written, or None."""
        return self._pending[0] if self._pending else None

    def maybe_finalize(self) -> None:
        """Complete the async save if every rank's writer is done (one small all-reduce); never waits."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=False)

    def finalize(self) -> None:
        """Wait for the async save, if any, and complete it."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        self.finalize()
        if self._queue is not None:
            self._queue.close()
            self._queue = None

    # ---- load ---------------------------------------------------------------------------------------

    def load(
        self, path: Path, student: Any, states: Sequence[Stateful] = (), discriminator: Any = None
    ) -> dict[str, Any]:
        """Restore checkpoint ``path``: model and optimizer, RNG, discriminator, then ``states`` in order (a
        staged run's second-stage schedule is set up there), then the student's own state (LR schedule, Adam's
        step count). Returns trainer_state.json."""
        state = json.loads((path / "trainer_state.json").read_text())
        # Checkpoints from before the format was recorded hold dp_reshardable optimizer state.
        fmt = state.get("optimizer_format", "dp_reshardable")
        saved_at = state.get("layout")
        _check_layout(path, fmt, saved_at, student)
        self._load_tensors(path / "model", student, fmt)
        rng = path / "rng" / f"rank_{_rank():05d}.json"
        if rng.is_file() and saved_at in (None, _layout(student)):  # another layout: other ranks, other streams
            _set_rng_state(json.loads(rng.read_text()))
        if discriminator is not None and discriminator.trainable and (path / "discriminator.pt").is_file():
            discriminator.load_state_dict(torch.load(path / "discriminator.pt", weights_only=True, map_location="cpu"))
        for part in states:
            part.load_state_dict(state)
        student.load_state_dict(state)
        self.last_saved_step = state["step"]
        return state

    def load_latest(
        self, student: Any, states: Sequence[Stateful] = (), discriminator: Any = None
    ) -> dict[str, Any] | None:
        """:meth:`load` of the latest complete checkpoint under this output folder; None when there is none."""
        path = latest_checkpoint(self.dir.parent)
        if path is None:
            return None
        state = self.load(path, student, states, discriminator)
        if _rank() == 0:
            log.info("resumed from %s (step %d)", path, state["step"])
        return state

    def _load_tensors(self, folder: Path, student: Any, optim_format: str) -> None:
        """Model and optimizer from a Megatron distributed checkpoint, at this rank's layout. Collective."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

        with torch.no_grad():
            sharded = student.sharded_state_dict(optim_format, is_loading=True)
            strategy = get_default_load_sharded_strategy(str(folder))
            if self.fully_parallel:
                strategy = FullyParallelLoadStrategyWrapper(strategy, _dp_group())
            # The offloading optimizer's param groups name its CPU / GPU optimizer classes; torch.load
            # (weights_only) accepts those classes, and nothing else beyond tensors and plain data.
            with torch.serialization.safe_globals(optimizer_classes(student.optimizer)):
                loaded = dist_checkpointing.load(sharded, str(folder), strategy)
            student.load_sharded_state_dict(loaded)

    # ---- when to save (save_every, the last step, a signal, the job's deadline) ---------------------------

    def watch_signals(self) -> None:
        """SIGTERM and SIGUSR1 (Slurm's warning before the time limit) ask for a save and a clean stop."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal = signum

    def save_if_due(
        self,
        step: int,
        last_step: bool,
        student: Any,
        states: Sequence[Stateful] = (),
        hf_dir: str | None = None,
        discriminator: Any = None,
    ) -> str | None:
        """Collective, after step ``step``: complete a finished async save; save at every ``save_every``-th step,
        the last one, and when a signal or the job's deadline asks to stop (then blocking). Returns why the run
        must stop ("signal", "deadline") or None."""
        self.maybe_finalize()
        due = self.deadline.due(self.last_save_seconds)  # the job ends before another step and save
        flag = torch.tensor([_DEADLINE if due else self._signal], dtype=torch.int64, device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = int(flag.item())
        if (self.save_every > 0 and step % self.save_every == 0) or last_step or stop:
            if self.on_save is not None:
                self.on_save(step)
            self.save(step, student, states, hf_dir, discriminator, block=bool(stop) or last_step)
        if not stop:
            return None
        if _rank() == 0:
            log.info("%s: saved step %d, exiting", "job end near" if stop == _DEADLINE else f"signal {stop}", step)
        return "deadline" if stop == _DEADLINE else "signal"


def _merged(student: Any, states: Sequence[Stateful]) -> dict[str, Any]:
    """trainer_state.json's parts: the student's and each state's keys, which must not collide."""
    out = student.state_dict()
    for part in states:
        got = part.state_dict()
        clash = sorted(set(got) & (set(out) | {"step", "optimizer_format", "layout"}))
        if clash:
            raise ValueError(f"checkpoint state: {type(part).__name__} repeats the keys {clash}")
        out.update(got)
    return out


def _check_layout(path: Path, optim_format: str, saved_at: dict[str, Any] | None, student: Any) -> None:
    """dp_reshardable optimizer state loads only at the layout it was saved at."""
    if optim_format != "dp_reshardable" or not student.parallel.use_distributed_optimizer or not saved_at:
        return
    now = _layout(student)
    if saved_at == now:
        return
    changed = ", ".join(f"{k} {saved_at.get(k)} -> {v}" for k, v in now.items() if saved_at.get(k) != v)
    raise ConfigError(
        f"{path}: its optimizer state is dp_reshardable, which loads only at the layout it was "
        f"saved at ({changed}); resume at that layout, or save with "
        f"train.ckpt_optim_format=fully_reshardable"
    )


# ---- save-by deadline ---------------------------------------------------------------------------------


def parse_end_time(value: str, where: str = "train.job_end_time") -> float:
    """Unix seconds from ``"1793718000"`` or an ISO time (local time unless it names a zone)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ConfigError(
            f"{where}={value!r}: expected auto, none, Unix seconds or an ISO time such as 2026-11-03T17:00:00"
        ) from None


def job_end_time(setting: str, environ: dict[str, str] | None = None) -> float | None:
    """When this job will be stopped (Unix seconds), or None: see TrainConfig.job_end_time."""
    env = os.environ if environ is None else environ
    if setting == "none":
        return None
    if setting != "auto":
        return parse_end_time(setting)
    if env.get("SLURM_JOB_END_TIME", "").strip():
        return parse_end_time(env["SLURM_JOB_END_TIME"].strip(), "SLURM_JOB_END_TIME")
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%e", "-j", job], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("job %s: could not ask squeue for the end time (%s); no save-by deadline", job, e)
        return None
    try:
        return parse_end_time(out, "squeue's end time")
    except ConfigError:  # N/A, NONE, Unknown: no time limit
        log.info("job %s: squeue gives no end time (%r); no save-by deadline", job, out)
        return None


class SaveDeadline:
    """Says when the last save must start: when the job's end is nearer than the longest recent step, plus
    the last save's duration, plus a margin (so the time-limit signal never arrives in a long step)."""

    def __init__(self, end_time: float | None, margin_s: float, window: int = 5) -> None:
        self.end, self.margin, self.window = end_time, margin_s, window
        self.steps: list[float] = []

    def record_step(self, seconds: float) -> None:
        self.steps = (self.steps + [seconds])[-self.window :]

    def due(self, save_seconds: float | None, now: float | None = None) -> bool:
        if self.end is None:
            return False
        need = max(self.steps, default=0.0) + (save_seconds or 0.0) + self.margin
        return (time.time() if now is None else now) + need >= self.end
