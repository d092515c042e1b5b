"""Process groups from torchrun's or Slurm's environment; NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import _cpu_shim
from .parallel import ParallelConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist ("gpu[001-004,007],cpu1" -> "gpu001") without needing scontrol."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_env(environ: dict[str, str] | None = None) -> DistEnv:
    """torchrun variables win; otherwise Slurm's (one task per GPU under srun); otherwise one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            # A per-job port keeps two jobs sharing a first node apart.
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
        )
    # One process: any free port (a fixed one collides with other jobs on the same machine).
    from .launch import free_port

    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()))


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> DistEnv:
    """Start torch.distributed and Megatron's model-parallel groups. Safe to call twice."""
    denv = read_env()
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        _cpu_shim.install()
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        if has_cuda:
            # The rank's own GPU, as its colocated rollout engine shard uses it (rollout/placement.py): the
            # local rank's when the node's GPUs are all visible, the only one when srun binds one per task.
            from .rollout.placement import shard_device, visible_devices

            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))
            torch.cuda.set_device(
                torch.device(
                    shard_device(
                        denv.local_rank,
                        max(local_world, denv.local_rank + 1),
                        visible_devices(dict(os.environ), torch.cuda.device_count()),
                    )
                )
            )
        dist.init_process_group(
            backend="nccl" if has_cuda else "gloo",
            init_method=f"tcp://{denv.master_addr}:{denv.master_port}",
            rank=denv.rank,
            world_size=denv.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return denv


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a small tensor for a collective on `group` (default: the world) must live: NCCL takes only CUDA
    tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
