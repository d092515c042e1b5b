"""Verifiable checks with a per-sample time limit, in a warm pool of worker processes.

``build_reward`` wraps every registered reward in :class:`TimedReward`: each (prompt, response) pair is
scored by the reward's own ``score`` in a worker process (pebble's ProcessPool). A check that runs past
``timeout_s`` (a regex that backtracks forever on a degenerate response, a checker bug that loops) has its
worker killed and replaced; the sample scores 0, is counted (``reward/timeouts`` via :meth:`take_stats`) and
logged with its prompt and response, and the other samples go on in the other workers. A worker that dies
(a crash, the OOM killer) costs its sample a 0 the same way (``reward/worker_crashes``). A bad prompt row
still raises, with the reward's own message.

Workers fork from a forkserver that has imported the reward's module, so they start in milliseconds and
stay up across steps (each keeps the reward, and its checker cache, built). They die with the process that
owns them (the forkserver exits with it; each worker has PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from uniapl_megatron.rewards.base import PromptRowError, RewardBase

log = logging.getLogger(__name__)

_SHOW = 2000  # characters of a timed-out prompt / response written to the log
_INNER: dict[tuple, Any] = {}  # in a worker: the reward built from (factory, config), kept across tasks
_OPEN_POOLS = [0]  # pools of this process that are up: they share one forkserver, stopped with the last


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):  # not Linux: the worker still exits when its pipe closes
        pass


def _score_one(factory: Callable[[Any], Any], config: Any, prompt: dict, response: str) -> float:
    key = (factory.__module__, factory.__qualname__, repr(config))
    reward = _INNER.get(key)
    if reward is None:
        reward = _INNER[key] = factory(config)
    return float(reward.score([prompt], [response])[0])


def _noop() -> None:
    pass


def _clip(text: Any) -> str:
    text = str(text)
    return text if len(text) <= _SHOW else f"{text[:_SHOW]}... [{len(text)} characters]"


class TimedReward(RewardBase):
    """A registered reward, scored sample by sample in killable worker processes with a time limit."""

    def __init__(
        self, name: str, factory: Callable[[Any], Any], config: Any, timeout_s: float, workers: int = 2
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"reward {name!r}: timeout_s must be > 0 for a pool, got {timeout_s}")
        if workers < 1:
            raise ValueError(f"reward {name!r}: workers must be >= 1, got {workers}")
        self.name, self.factory, self.config = name, factory, config
        self.timeout_s, self.workers = timeout_s, workers
        self.timeouts = self.crashes = 0  # over the run
        self._stats = {"timeouts": 0, "crashes": 0}  # since the last take_stats()
        self._pool: Any = None
        self._closed = False
        self._lock = threading.Lock()
        # Workers start now, in the background, so the first step's scoring finds them up.
        threading.Thread(target=self._ensure_pool, args=(True,), name="reward-pool-start", daemon=True).start()

    def _ensure_pool(self, start: bool = False) -> Any:
        with self._lock:
            if self._closed:
                if start:
                    return None
                raise RuntimeError(f"reward {self.name!r}: score() after close()")
            if self._pool is None:
                from pebble import ProcessPool

                ctx = multiprocessing.get_context("forkserver")
                # Imported once by the forkserver, so workers (and their replacements) start without it.
                ctx.set_forkserver_preload([__name__, self.factory.__module__])
                self._pool = ProcessPool(max_workers=self.workers, context=ctx, initializer=_die_with_parent)
                _OPEN_POOLS[0] += 1
                if start:
                    self._pool.schedule(_noop)
            return self._pool

    def score(self, prompts: list[dict], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise PromptRowError(
                f"got {len(prompts)} prompt rows but {len(responses)} responses; expected one response per row"
            )
        from pebble import ProcessExpired

        pool = self._ensure_pool()
        futures = [
            pool.schedule(_score_one, args=(self.factory, self.config, p, r), timeout=self.timeout_s)
            for p, r in zip(prompts, responses)
        ]
        out = []
        try:
            for i, (fut, p, r) in enumerate(zip(futures, prompts, responses)):
                try:
                    out.append(fut.result())
                except FutureTimeout:
                    out.append(0.0)
                    self._count("timeouts", i, p, r, f"ran past its {self.timeout_s:g} s limit")
                except ProcessExpired as e:
                    out.append(0.0)
                    self._count("crashes", i, p, r, f"killed its worker ({e})")
        finally:
            for fut in futures:  # a raised error leaves the rest unneeded
                fut.cancel()
        return out

    def _count(self, what: str, i: int, prompt: Any, response: str, why: str) -> None:
        self._stats[what] += 1
        if what == "timeouts":
            self.timeouts += 1
        else:
            self.crashes += 1
        text = prompt.get("prompt", prompt) if isinstance(prompt, dict) else prompt
        log.warning(
            "reward %s: sample %d %s; it scores 0. prompt: %s | response: %s",
            self.name,
            i,
            why,
            _clip(text),
            _clip(response),
        )

    def take_stats(self) -> dict[str, float]:
        """``reward/timeouts`` and ``reward/worker_crashes`` since the last call."""
        out = {
            "reward/timeouts": float(self._stats["timeouts"]),
            "reward/worker_crashes": float(self._stats["crashes"]),
        }
        self._stats = {"timeouts": 0, "crashes": 0}
        return out

    def close(self) -> None:
        """Stop the workers; the last open pool also stops multiprocessing's forkserver, which would otherwise
        outlive this process by the seconds its own exit takes (and whose exit kills every pool's workers)."""
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.stop()
                self._pool.join()
                self._pool = None
                _OPEN_POOLS[0] -= 1
                if _OPEN_POOLS[0] == 0:
                    _stop_forkserver()


def _stop_forkserver(wait_s: float = 10.0) -> None:
    """What multiprocessing.forkserver's own (test-only) _stop does: close the pipe whose EOF tells the server
    to exit, and reap it; waiting at most ``wait_s`` (a forked child of this process keeps the pipe open)."""
    import os
    import time
    from multiprocessing import forkserver, util

    server = getattr(forkserver, "_forkserver", None)
    pid, fd = getattr(server, "_forkserver_pid", None), getattr(server, "_forkserver_alive_fd", None)
    if server is None or pid is None or fd is None:
        return
    with server._lock:
        os.close(fd)
        server._forkserver_alive_fd = server._forkserver_pid = None
        address, server._forkserver_address = server._forkserver_address, None
        if address and not util.is_abstract_socket_namespace(address):  # Linux: abstract, no file
            os.unlink(address)
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.05)
