"""The trainer's side of disaggregated rollout: a RolloutEngine whose engines are `uniapl rollout` servers.

Rank 0 of the trainer listens on the control address (config.control_address); the servers -- one engine
per rollout-TP group of every rollout node's GPUs (slurm/_launch.sh starts them; each says how many there
are) -- connect, start their engines and say "ready". Weights go by broadcast from this process (rank 0 of a
group of its own) to every server's engine workers; generate requests split the prompts into contiguous
parts, one per server (placement.split_bounds, as colocated engines do), and merge the answers in prompt
order. A server whose engine crashed and restarted
answers "needs_weights": this client then raises EngineNeedsWeights, and the next update_weights re-joins
the broadcast group (the restarted workers are new processes) before sending.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import time
from typing import Any, Iterable, Sequence

import torch

from .base import EngineBase, EngineNeedsWeights, RolloutBatch, SamplingParams
from .config import RolloutConfig, control_address
from .control import Conn, ControlError, params_to_dict, sample_from_list
from .placement import split_bounds
from .weight_sync import NamedTensor, SyncStats, WeightChannel, WeightsSource, WeightSyncError, send_weights

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # all interfaces: the servers connect from other nodes
        return s.getsockname()[1]


class RemoteRolloutEngine(EngineBase):
    """RolloutEngine over the rollout servers (rollout.mode: disaggregated); rollout.engine names the servers'."""

    def __init__(self, config: RolloutConfig) -> None:
        self.config = config
        self.host, self.port = control_address(config)
        self.timeout_s = float(config.connect_timeout_s)
        self.restarts = 0
        self.last_sync = SyncStats()
        self._servers: list[tuple[Conn, int]] = []  # (connection, tensor-parallel size), by server rank
        self._channel: WeightChannel | None = None
        self._backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            self._listener = socket.create_server(("", self.port))
        except OSError as e:
            raise ControlError(
                f"rollout: cannot listen on port {self.port} for the rollout servers "
                f"(rollout.control_port / MASTER_PORT + 17): {e}"
            ) from e
        try:
            self._accept_servers()
        except BaseException:
            self.shutdown()
            raise

    @property
    def num_engines(self) -> int:  # type: ignore[override]
        """One engine per rollout server."""
        return len(self._servers)

    def _accept_servers(self) -> None:
        nodes, deadline = self.config.num_nodes, time.monotonic() + self.timeout_s
        want: int | None = None  # servers in all: the first "ready" says (at least one per node until then)
        ready: dict[int, tuple[Conn, int]] = {}
        while len(ready) < (want or nodes):
            left = deadline - time.monotonic()
            self._listener.settimeout(max(left, 0.01))
            try:
                sock, addr = self._listener.accept()
            except (TimeoutError, socket.timeout):
                raise TimeoutError(
                    f"rollout: {len(ready)} of {want or nodes} rollout servers (rollout.num_nodes={nodes}) connected "
                    f"to the trainer at {self.host}:{self.port} within {self.timeout_s:g} s "
                    f"(rollout.connect_timeout_s); start `uniapl rollout CONFIG` with the same config and overrides "
                    f"(slurm/_launch.sh does, one per rollout-TP group of GPUs of the last rollout.num_nodes "
                    f"nodes)"
                ) from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock, f"rollout server at {addr[0]}:{addr[1]}")
            msg = conn.recv(max(deadline - time.monotonic(), 1.0))  # the server starts its engine first
            if not msg or msg.get("op") != "ready" or not isinstance(msg.get("rank"), int):
                conn.close()
                raise ControlError(f"{conn.peer}: expected a 'ready' message, got {msg!r}")
            servers = msg.get("servers", nodes)
            if not isinstance(servers, int) or servers < nodes or servers % nodes or want not in (None, servers):
                conn.close()
                raise ControlError(
                    f"{conn.peer}: says there are {servers!r} rollout servers; expected the same "
                    f"number from every server, a multiple of rollout.num_nodes={nodes}"
                )
            want = servers
            if msg["rank"] in ready or not 0 <= msg["rank"] < want:
                conn.close()
                raise ControlError(f"{conn.peer}: rank {msg['rank']} is taken or not in [0, {want})")
            conn.peer = f"rollout server {msg['rank']} at {addr[0]}:{addr[1]}"
            ready[msg["rank"]] = (conn, int(msg.get("tensor_parallel_size", 1)))
            log.info("%s ready", conn.peer)
        self._servers = [ready[r] for r in range(len(ready))]
        log.info("rollout: %d servers (engines) on %d node(s) ready", len(ready), nodes)

    def _ask_all(self, msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send one message to each server, then read every answer (all read, so the streams stay in step)."""
        for (conn, _), msg in zip(self._servers, msgs):
            conn.send(msg)
        return [self._answer(conn) for conn, _ in self._servers[: len(msgs)]]

    def _answer(self, conn: Conn) -> dict[str, Any]:
        msg = conn.recv(self.timeout_s)
        if msg is None:
            raise ControlError(f"{conn.peer} closed the connection (see its log)")
        return msg

    def _note_restarts(self, answers: list[dict[str, Any]]) -> None:
        self.restarts = max(self.restarts, sum(int(a.get("restarts", 0)) for a in answers))

    def _drop_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _connect(self) -> None:
        """(Re)build the broadcast group: this process is rank 0, server k's workers follow in order."""
        self._drop_channel()
        port, world = _free_port(), 1 + sum(tp for _, tp in self._servers)
        msgs, offset = [], 1
        for _, tp in self._servers:
            msgs.append(
                {
                    "op": "connect",
                    "host": self.host,
                    "port": port,
                    "world_size": world,
                    "rank_offset": offset,
                    "backend": self._backend,
                }
            )
            offset += tp
        for (conn, _), msg in zip(self._servers, msgs):
            conn.send(msg)
        device = torch.device("cuda", torch.cuda.current_device()) if self._backend == "nccl" else "cpu"
        self._channel = WeightChannel(self.host, port, 0, world, self._backend, device, self.timeout_s)
        self._check([self._answer(conn) for conn, _ in self._servers], "connect")

    def _check(self, answers: list[dict[str, Any]], what: str) -> None:
        self._note_restarts(answers)
        bad = [(conn, a) for (conn, _), a in zip(self._servers, answers) if not a.get("ok")]
        if any(a.get("needs_weights") for _, a in bad):
            self._drop_channel()
            raise EngineNeedsWeights("; ".join(f"{c.peer}: {a.get('error')}" for c, a in bad))
        if bad:
            if what in ("connect", "sync"):
                self._drop_channel()  # half-loaded engines restart: the next sync re-joins first
            raise RuntimeError(f"rollout {what}: " + "; ".join(f"{c.peer}: {a.get('error')}" for c, a in bad))

    # ---- protocol ---------------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[NamedTensor] | WeightsSource) -> None:
        """Broadcast the weights to every server's engine (one bucketed sync; see weight_sync.py)."""
        if callable(named_tensors):
            named_tensors = named_tensors()
        if self._channel is None:
            self._connect()
        for conn, _ in self._servers:
            conn.send({"op": "sync"})
        try:
            stats = send_weights(named_tensors, self._channel, self.config.bucket_bytes)
        except Exception:
            with contextlib.suppress(Exception):  # the servers got the abort marker; keep the streams in step
                self._note_restarts([self._answer(conn) for conn, _ in self._servers])
            self._drop_channel()
            raise
        self._check([self._answer(conn) for conn, _ in self._servers], "sync")
        if stats.tensors == 0:
            raise WeightSyncError("update_weights: the iterator yielded no tensors")
        self.last_sync = stats

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Prompts split into contiguous parts, one per server; samples come back in prompt order. Each part
        carries its first prompt's index, so the samples do not depend on rollout.num_nodes."""
        n = len(self._servers)
        bounds = split_bounds(len(prompts), n)
        msgs = [
            {
                "op": "generate",
                "prompts": [[int(t) for t in p] for p in prompts[bounds[k] : bounds[k + 1]]],
                "params": params_to_dict(
                    dataclasses.replace(params, prompt_index_offset=params.prompt_index_offset + bounds[k])
                ),
            }
            for k in range(n)
        ]
        answers = self._ask_all(msgs)  # a server with no prompts answers at once
        self._check(answers, "generate")
        batch = RolloutBatch()
        for (conn, _), a, lo in zip(self._servers, answers, bounds):
            batch.samples += [sample_from_list(x, lo, conn.peer) for x in a.get("samples", [])]
        return batch

    def sleep(self) -> None:
        """Nothing to release: the engines have devices of their own."""

    def wake(self) -> None:
        """Nothing to take back (see sleep)."""

    def shutdown(self) -> None:
        """Tell every server to stop (they shut their engines down and exit), then close everything."""
        for conn, _ in self._servers:
            with contextlib.suppress(ControlError):
                conn.send({"op": "stop"})
        for conn, _ in self._servers:
            with contextlib.suppress(ControlError):
                conn.recv(min(self.timeout_s, 120.0))
            conn.close()
        self._servers = []
        self._drop_channel()
        listener, self._listener = getattr(self, "_listener", None), None
        if listener is not None:
            listener.close()
