"""`uniapl rollout`: one rollout server of a disaggregated run (one engine per rollout-TP group of each rollout
node's GPUs; slurm/_launch.sh starts them and cli.py gives each its own GPUs, rollout/placement.py).

It connects to the trainer's control address (rank 0 of `uniapl train`, see config.control_address), starts
its engine, says "ready", then serves weight syncs and generate requests (control.py) until the trainer
says "stop" or goes away. An engine rebuilt after a weight load failed half-way answers "needs_weights"; the
trainer then re-connects the weight group and re-sends the weights. The engine runs in this process, so a
crash of the engine itself ends the server (the job then resumes from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from typing import Any

from .base import EngineNeedsWeights, RolloutEngine
from .config import RolloutConfig, control_address
from .control import Conn, connect, params_from_dict, sample_to_list
from .weight_sync import WeightChannel, receive_weights

log = logging.getLogger(__name__)


class _Server:
    def __init__(self, cfg: RolloutConfig, engine: RolloutEngine) -> None:
        self.cfg, self.engine = cfg, engine
        self.channel: WeightChannel | None = None  # engines that do not receive the broadcast: this process does

    def connect(self, msg: dict[str, Any]) -> dict[str, Any]:
        host, port, world, offset = str(msg["host"]), int(msg["port"]), int(msg["world_size"]), int(msg["rank_offset"])
        backend = str(msg.get("backend", "gloo"))
        if self.engine.receives_broadcast:
            self.engine.connect(host, port, world, backend, self.cfg.connect_timeout_s, rank_offset=offset)
        else:
            if self.channel is not None:
                self.channel.close()
            self.channel = WeightChannel(
                host, port, offset, world, backend, "cpu" if backend == "gloo" else "cuda", self.cfg.connect_timeout_s
            )
        return {}

    def sync(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.engine.receives_broadcast:
            self.engine.receive_weights()
        elif self.channel is not None:
            self.engine.update_weights(receive_weights(self.channel))
        else:
            raise RuntimeError("sync before connect")
        stats = self.engine.last_sync
        return {"tensors": stats.tensors, "bytes": stats.bytes}

    def generate(self, msg: dict[str, Any]) -> dict[str, Any]:
        prompts = msg.get("prompts")
        if not isinstance(prompts, list):
            raise ValueError(f"generate: 'prompts' must be a list of token-id lists, got {type(prompts).__name__}")
        params = params_from_dict(msg.get("params", {}))
        if not prompts:  # more servers than the step has prompts
            return {"samples": []}
        batch = self.engine.generate(prompts, params)
        return {"samples": [sample_to_list(s) for s in batch.samples]}

    def answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        handler = {"connect": self.connect, "sync": self.sync, "generate": self.generate}.get(op)
        try:
            if handler is None:
                raise ValueError(f"unknown op {op!r} (expected connect, sync, generate or stop)")
            reply = {"ok": True, **handler(msg)}
        except EngineNeedsWeights as e:
            reply = {"ok": False, "needs_weights": True, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - reported to the trainer, which raises it there
            log.exception("rollout server: %s failed", op)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply["restarts"] = self.engine.restarts
        return reply


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally below: the engine shuts down cleanly


def serve(cfg: RolloutConfig, rank: int = 0, servers: int | None = None) -> int:
    """Serve the trainer until it says stop (0) or goes away (1). `servers`: how many rollout servers the job
    runs (WORLD_SIZE of the rollout step: one per rollout-TP group of GPUs on each rollout node); default one
    per node."""
    from . import start_engine

    servers = cfg.num_nodes if servers is None else servers
    if cfg.mode != "disaggregated":
        raise ValueError(f"rollout.mode: `uniapl rollout` serves mode 'disaggregated', got {cfg.mode!r}")
    if servers < cfg.num_nodes or servers % cfg.num_nodes:
        raise ValueError(
            f"{servers} rollout servers (WORLD_SIZE) is not a multiple of rollout.num_nodes="
            f"{cfg.num_nodes}: each rollout node runs the same number of engines"
        )
    if not 0 <= rank < servers:
        raise ValueError(f"rollout server rank {rank} (RANK) is not in [0, {servers}) (WORLD_SIZE servers)")
    host, port = control_address(cfg)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    conn: Conn = connect(host, port, cfg.connect_timeout_s)  # first: fail fast when the trainer is unreachable
    engine = None
    try:
        # The disaggregated engine holds the trainer's weight group in its workers, not a local one.
        engine = start_engine(dataclasses.replace(cfg, multiprocess=False))
        tp = cfg.tensor_parallel_size if engine.receives_broadcast else 1
        conn.send({"op": "ready", "rank": rank, "servers": servers, "tensor_parallel_size": tp})
        print(f"rollout server {rank}: serving the trainer at {host}:{port}", file=sys.stderr, flush=True)
        server = _Server(cfg, engine)
        while True:
            msg = conn.recv(None)
            if msg is None:
                print(
                    f"rollout server {rank}: the trainer at {host}:{port} closed the connection without 'stop'",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
            if msg.get("op") == "stop":
                engine.shutdown()
                engine = None
                conn.send({"ok": True, "restarts": 0})
                return 0
            conn.send(server.answer(msg))
    finally:
        if engine is not None:
            engine.shutdown()
        conn.close()
