"""The parallel layout (TP, SP, PP, VPP, EP, CP, DP) and its validation against model and world size."""

from __future__ import annotations

from dataclasses import dataclass

from .models.arch import ConfigError, Qwen3Arch


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """TP: each linear layer split over this many ranks (Megatron ColumnParallel/RowParallel)."""
    sequence_parallel: bool = False
    """SP: activations outside attention/MLP also split along the sequence over the TP group (needs TP > 1)."""
    pipeline_model_parallel_size: int = 1
    """PP: layers split into this many consecutive stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """VPP: model chunks per PP stage for the interleaved schedule (None = not interleaved)."""
    expert_model_parallel_size: int = 1
    """EP: MoE experts split over this many ranks (carved out of the data-parallel ranks)."""
    context_parallel_size: int = 1
    """CP: long sequences split over this many ranks. Only 1 is accepted: the trainer does not slice packed
    sequences per CP rank (validate() refuses CP > 1 with the reason)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state (and fp32 main params) over data-parallel ranks (ZeRO-1)."""

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    @property
    def micro_batch_multiple(self) -> int:
        """Micro-batches per step must be a multiple of this: PP under the interleaved (VPP) schedule,
        which runs them in groups of PP (Megatron's default microbatch_group_size_per_vp_stage), else 1."""
        return self.pipeline_model_parallel_size if self.virtual_pipeline_model_parallel_size else 1

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def num_query_groups(self, arch: Qwen3Arch) -> int:
        """KV heads as Megatron sees them: replicated up to TP when TP exceeds the model's KV heads."""
        return max(arch.num_kv_heads, self.tensor_model_parallel_size)

    def validate(self, arch: Qwen3Arch, world_size: int, has_cuda: bool = False) -> None:
        """Stop early, naming the numbers that disagree."""
        tp, pp, cp, ep = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.context_parallel_size,
            self.expert_model_parallel_size,
        )
        vpp = self.virtual_pipeline_model_parallel_size
        for name, v in (("tensor", tp), ("pipeline", pp), ("context", cp), ("expert", ep)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"parallel.{name}_model_parallel_size must be an integer >= 1, got {v!r}")
        problems = []
        if world_size % (tp * pp * cp):
            problems.append(f"world size {world_size} is not a multiple of TP*PP*CP = {tp}*{pp}*{cp} = {tp * pp * cp}")
        elif (world_size // (tp * pp * cp) * cp) % ep:
            problems.append(
                f"expert parallel size {ep} does not divide data-parallel*context-parallel ranks "
                f"{world_size // (tp * pp * cp) * cp} (world {world_size} / TP*PP = {tp * pp})"
            )
        if arch.num_heads % tp:
            problems.append(f"num_attention_heads={arch.num_heads} is not divisible by TP={tp}")
        kv = arch.num_kv_heads
        if kv % tp and tp % kv:
            problems.append(
                f"num_key_value_heads={kv} and TP={tp}: one must divide the other "
                "(TP larger than the KV heads replicates them, which needs TP to be a multiple)"
            )
        chunks = pp * (vpp or 1)
        if arch.num_layers % chunks:
            problems.append(
                f"num_hidden_layers={arch.num_layers} is not divisible by PP*VPP = {pp}*{vpp or 1} = {chunks}"
            )
        if vpp is not None and (not isinstance(vpp, int) or vpp < 2 or pp < 2):
            problems.append(
                f"virtual_pipeline_model_parallel_size={vpp!r}: the interleaved schedule needs an integer "
                f">= 2 and PP >= 2 (PP={pp}); leave it null for the plain pipeline schedule"
            )
        if self.sequence_parallel and tp < 2:
            problems.append("sequence_parallel=true needs tensor_model_parallel_size > 1")
        if ep > 1 and not arch.is_moe:
            problems.append(f"expert_model_parallel_size={ep} but the model has no experts")
        if arch.is_moe and arch.num_experts % ep:
            problems.append(f"num_experts={arch.num_experts} is not divisible by EP={ep}")
        if cp > 1:
            problems.append(
                f"context_parallel_size={cp} is refused: the trainer does not yet give each CP rank its slice of "
                "the packed sequences nor count tokens over the CP group, so it would train on wrong data; it "
                "also needs Transformer Engine's attention on >= 2 GPUs, so it cannot be built and tested here"
                + ("" if has_cuda else " (and this machine has no GPU)")
            )
        if problems:
            raise ConfigError("invalid parallel layout:\n  - " + "\n  - ".join(problems))
