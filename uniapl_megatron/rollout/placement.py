"""Where rollout engines run and which prompts each one generates: pure functions, no torch, no processes.

Colocated: one engine per rollout-TP group of training ranks (ranks g*T .. g*T+T-1 for rollout TP T), each
shard on its own rank's GPU, so an engine never touches a GPU of a rank outside it. Disaggregated: one
engine per T GPUs of every rollout node. Either way a step's prompts are split into contiguous shares, one
per engine; a sample's seed comes from its position in the whole step (SamplingParams.prompt_index_offset),
so the samples do not depend on how many engines there are.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlacementError(ValueError):
    """A layout whose engines cannot be placed; the message names the numbers and the field to change."""


def split_bounds(n_items: int, n_parts: int) -> list[int]:
    """Boundaries of `n_parts` contiguous shares of `n_items` (sizes differ by at most one):
    share k is [bounds[k], bounds[k+1])."""
    if n_parts < 1:
        raise ValueError(f"n_parts: expected >= 1, got {n_parts}")
    return [n_items * k // n_parts for k in range(n_parts + 1)]


@dataclass(frozen=True)
class EnginePlacement:
    """One rank's view of the colocated engines."""

    engine: int  # the engine this rank serves (its rollout-TP group)
    num_engines: int
    ranks: tuple[int, ...]  # global ranks of this engine, shard order
    shard: int  # this rank's place in the engine (its rollout-TP rank)
    device: str  # torch device of this shard: "cpu" or "cuda:N" (N counts the devices this process sees)
    node_gpus: tuple[int, ...]  # node-local GPU of each shard (its rank's local rank); () on CPU
    refit_ranks: tuple[int, ...]  # training ranks whose TP shards make up this engine's weights (per stage)

    @property
    def leader(self) -> int:
        return self.ranks[0]


def visible_devices(environ: dict[str, str], gpu_count: int) -> list[str]:
    """GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (or 0..count-1 when it is unset)."""
    env = environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(gpu_count)]
    return [d.strip() for d in env.split(",") if d.strip()][:gpu_count] if gpu_count else []


def shard_device(local_rank: int, local_world_size: int, visible: list[str]) -> str:
    """The device of a rank's own GPU: every GPU of the node visible (torchrun) -> cuda:<local rank>; one GPU
    visible (srun binding one per task) -> cuda:0; no GPU -> cpu. Anything else would put two ranks on
    one GPU or guess, and is refused."""
    if not visible:
        return "cpu"
    if len(set(visible)) != len(visible):
        raise PlacementError(f"CUDA_VISIBLE_DEVICES names a GPU twice: {','.join(visible)}")
    if len(visible) == 1:
        return "cuda:0"
    if len(visible) < local_world_size:
        raise PlacementError(
            f"{local_world_size} ranks on this node but {len(visible)} visible GPUs "
            f"({','.join(visible)}): two ranks would share a GPU"
        )
    return f"cuda:{local_rank}"


def place_colocated(
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    visible: list[str],
    train_tp: int,
    rollout_tp: int,
) -> EnginePlacement:
    """This rank's engine, shard and device when every rollout-TP group of training ranks runs one engine.

    Refused (PlacementError): rollout TP that does not divide the world size, or that spans nodes (an
    engine's shards must be the GPUs of its own ranks, on one node), and GPU visibility that would put two
    ranks on one GPU."""
    for name, v in (
        ("rollout.tensor_parallel_size", rollout_tp),
        ("parallel.tensor_model_parallel_size", train_tp),
        ("world size", world_size),
        ("ranks per node", local_world_size),
    ):
        if not isinstance(v, int) or v < 1:
            raise PlacementError(f"{name}: expected an integer >= 1, got {v!r}")
    if not 0 <= rank < world_size or not 0 <= local_rank < local_world_size:
        raise PlacementError(
            f"rank {rank} / local rank {local_rank} outside world {world_size} / node {local_world_size}"
        )
    if world_size % rollout_tp:
        raise PlacementError(
            f"rollout.tensor_parallel_size={rollout_tp} does not divide the {world_size} training "
            f"ranks: colocated engines are groups of that many ranks"
        )
    if local_world_size % rollout_tp:
        raise PlacementError(
            f"rollout.tensor_parallel_size={rollout_tp} does not divide the {local_world_size} "
            f"ranks of a node: an engine would span two nodes (use at most {local_world_size}, "
            f"a divisor of it)"
        )
    device = shard_device(local_rank, local_world_size, visible)
    engine, shard = divmod(rank, rollout_tp)
    ranks = tuple(range(engine * rollout_tp, (engine + 1) * rollout_tp))
    node_gpus = tuple(local_rank - shard + s for s in range(rollout_tp)) if visible else ()
    first_tp, last_tp = ranks[0] // train_tp * train_tp, (ranks[-1] // train_tp + 1) * train_tp
    return EnginePlacement(
        engine, world_size // rollout_tp, ranks, shard, device, node_gpus, tuple(range(first_tp, last_tp))
    )


def place_disaggregated(num_nodes: int, gpus_per_node: int, rollout_tp: int) -> list[tuple[int, tuple[int, ...]]]:
    """(node, node-local GPUs) of each rollout engine: every rollout GPU runs a shard of one engine, engines
    in node order. On CPU nodes (gpus_per_node 0) one engine per node."""
    if num_nodes < 1:
        raise PlacementError(f"rollout.num_nodes: expected >= 1 for disaggregated rollout, got {num_nodes}")
    if gpus_per_node == 0:
        return [(n, ()) for n in range(num_nodes)]
    if gpus_per_node % rollout_tp:
        raise PlacementError(
            f"rollout.tensor_parallel_size={rollout_tp} does not divide the {gpus_per_node} GPUs "
            f"of a rollout node: some GPUs would stay idle or an engine would span nodes"
        )
    return [(n, tuple(range(g, g + rollout_tp))) for n in range(num_nodes) for g in range(0, gpus_per_node, rollout_tp)]


def server_devices(local_id: int, rollout_tp: int, visible: str | None) -> list[str] | None:
    """The GPUs of rollout server `local_id` of its node (disaggregated): its rollout-TP group of the GPUs the
    node's tasks see (CUDA_VISIBLE_DEVICES as Slurm sets it), or all of them when the task sees exactly its
    own. None on a CPU node (nothing visible or set)."""
    if not visible:
        return None
    gpus = [d.strip() for d in visible.split(",") if d.strip()]
    if len(gpus) == rollout_tp:
        return gpus
    lo = local_id * rollout_tp
    if len(gpus) % rollout_tp or lo + rollout_tp > len(gpus):
        raise PlacementError(
            f"rollout server {local_id} of its node with rollout.tensor_parallel_size="
            f"{rollout_tp} needs GPUs {lo}..{lo + rollout_tp - 1} of the node, but the task sees "
            f"{len(gpus)} (CUDA_VISIBLE_DEVICES={visible}): start (GPUs per node / TP) servers "
            f"per node"
        )
    return gpus[lo : lo + rollout_tp]
