"""The disaggregated rollout's control channel: one JSON object per line over TCP (no pickle), between the
trainer's rank 0 (listens) and each `uniapl rollout` server (connects). Weights do not travel here: they go
by torch.distributed broadcast (weight_sync.py) on a port the trainer names in a "connect" message.

Requests (trainer -> server) and replies ({"ok": true, ...} or {"ok": false, "error": ..., "needs_weights"}):
  ready     (server -> trainer, once) {"rank", "tensor_parallel_size"}
  connect   {"host", "port", "world_size", "rank_offset", "backend"}: join the weight broadcast group
  sync      receive one weight sync on that group
  generate  {"prompts": [[ids]], "params": SamplingParams fields} -> {"samples": [[i, ids, logprobs, reason]]}
  stop      shut the engine down; the server exits 0
Every reply carries "restarts" (engine restarts so far).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from typing import Any

from .base import Sample, SamplingParams

MAX_LINE = 1 << 30  # one generate reply holds every sample of a step


class ControlError(ConnectionError):
    """The other side closed the connection, answered garbage, or did not answer in time."""


class Conn:
    """One JSON-lines connection; `peer` names the other side in every error."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock, self.peer = sock, peer
        self._rfile = sock.makefile("rb")

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise ControlError(f"control channel to {self.peer}: send failed ({e})") from e

    def recv(self, timeout_s: float | None) -> dict[str, Any] | None:
        """The next message; None when the other side closed the connection cleanly."""
        self.sock.settimeout(timeout_s)
        try:
            line = self._rfile.readline(MAX_LINE)
        except (TimeoutError, socket.timeout) as e:
            raise ControlError(f"control channel to {self.peer}: no answer within {timeout_s:.0f} s") from e
        except OSError as e:
            raise ControlError(f"control channel to {self.peer}: receive failed ({e})") from e
        if not line:
            return None
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise ControlError(f"control channel to {self.peer}: not a JSON line ({e})") from e
        if not isinstance(msg, dict):
            raise ControlError(f"control channel to {self.peer}: expected a JSON object, got {type(msg).__name__}")
        return msg

    def close(self) -> None:
        for f in (self._rfile, self.sock):
            try:
                f.close()
            except OSError:
                pass


def connect(host: str, port: int, timeout_s: float, peer: str = "the trainer") -> Conn:
    """Connect to host:port, retrying until timeout_s (the trainer may still be starting)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection((host, port), timeout=min(10.0, timeout_s))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return Conn(sock, f"{peer} at {host}:{port}")
        except OSError as e:
            last = e
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise TimeoutError(
        f"cannot reach {peer} at {host}:{port} within {timeout_s:g} s (last error: {last}); is "
        f"`uniapl train` running with rollout.mode=disaggregated and the same rollout.control_host/"
        f"control_port (or MASTER_ADDR / MASTER_PORT)?"
    )


def params_to_dict(params: SamplingParams) -> dict[str, Any]:
    d = dataclasses.asdict(params)
    d["stop_token_ids"] = list(d["stop_token_ids"])
    return d


def params_from_dict(d: Any) -> SamplingParams:
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    if not isinstance(d, dict) or set(d) - names:
        raise ValueError(f"generate: params must be an object with keys among {sorted(names)}, got {d!r}")
    d = dict(d)
    if "stop_token_ids" in d:
        d["stop_token_ids"] = tuple(int(t) for t in d["stop_token_ids"])
    return SamplingParams(**d)


def sample_to_list(s: Sample) -> list[Any]:
    return [s.prompt_index, s.token_ids, s.logprobs, s.finish_reason]


def sample_from_list(x: Any, offset: int, peer: str) -> Sample:
    try:
        i, ids, lps, reason = x
        return Sample(
            prompt_index=int(i) + offset,
            token_ids=[int(t) for t in ids],
            logprobs=[float(v) for v in lps],
            finish_reason=str(reason),
        )
    except (TypeError, ValueError) as e:
        raise ControlError(f"control channel to {peer}: malformed sample {str(x)[:200]}") from e
