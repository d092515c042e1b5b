"""Per-GPU memory planner: will a parallel layout fit the GPU, before anything is launched?

For a Hugging Face Qwen3 / Qwen3-MoE `config.json` and a Megatron parallel layout it estimates, for
the fullest pipeline stage, the bytes of: bf16 weights, fp32 gradients (Megatron's main_grad),
optimizer state (fp32 master weights + Adam m and v, sharded over data-parallel ranks by the
distributed optimizer), activations of the micro-batches in flight, the vocab-parallel logits, the
rollout engine's shard on the same GPU (colocated: one engine per rollout-TP group of training GPUs, asleep
while the trainer steps), the weight sync's bucket and gathered layer, and a fixed runtime reserve. `check` refuses a
plan that does not fit, with a message that lists every part.

The formulas are derived for pre-norm Qwen3 layers (GQA, q/k RMSNorm, SwiGLU, no dropout, no bias)
the way Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models")
count activations; they are estimates (no allocator caching, average MoE routing), so the reserve
and a margin matter. tools/plan_memory.py reads these inputs from a recipe YAML (+ key=value overrides).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The inputs and per-part estimators live in memory_estimates; re-exported so callers import from one place.
from .memory_estimates import (  # noqa: F401
    BF16,
    ENGINE_WEIGHTS,
    FP32,
    GIB,
    Layout,
    ModelShape,
    PlanError,
    RolloutShape,
    TrainShape,
    layer_act_bytes_per_token,
    layer_params,
    padded_vocab,
    param_count,
    refit_bytes,
    rollout_parts,
    validate,
)


class DoesNotFit(PlanError):
    """The layout is consistent but needs more memory than the GPU has."""


@dataclass
class StagePlan:
    """Bytes on one GPU of one pipeline stage, by part."""

    stage: int
    params: float  # parameter count on this GPU
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class MemoryPlan:
    stages: list[StagePlan]  # one per pipeline stage
    capacity: float  # GPU bytes
    rollout_node: dict[str, float] | None = None  # disaggregated: a rollout GPU's parts
    problems: list[str] = field(default_factory=list)  # reasons to refuse beyond the totals

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        rollout_ok = self.rollout_node is None or sum(self.rollout_node.values()) <= self.capacity
        return self.worst.total <= self.capacity and rollout_ok and not self.problems

    def describe(self) -> str:
        """One line per part of the fullest stage, in GiB, then the total against the GPU."""
        w = self.worst
        lines = [
            f"per-GPU memory, pipeline stage {w.stage} of {len(self.stages)} "
            f"({w.params / 1e9:.3f}B parameters on this GPU):"
        ]
        lines += [f"  {name:<66s} {b / GIB:8.2f} GiB" for name, b in w.parts.items()]
        lines.append(f"  {'total':<66s} {w.total / GIB:8.2f} GiB of {self.capacity / GIB:.2f} GiB")
        if self.rollout_node is not None:
            lines.append("rollout node GPU (disaggregated):")
            lines += [f"  {n:<66s} {b / GIB:8.2f} GiB" for n, b in self.rollout_node.items()]
            total = sum(self.rollout_node.values())
            lines.append(f"  {'total':<66s} {total / GIB:8.2f} GiB of {self.capacity / GIB:.2f} GiB")
        return "\n".join(lines)


def plan(
    shape: ModelShape,
    lay: Layout,
    train: TrainShape,
    rollout: RolloutShape | None,
    gpu_bytes: float,
    reserve_bytes: float = 4 * GIB,
    resident: dict[str, float] | None = None,
) -> MemoryPlan:
    """Estimate every pipeline stage's per-GPU memory. Raises PlanError for inconsistent layouts.

    `rollout` None: no rollout engine (SFT only). `resident`: other bytes every GPU holds all the
    time (e.g. the discriminator), by name.
    """
    validate(shape, lay, train)
    on_train_gpu, rollout_node, problems = rollout_parts(shape, rollout, gpu_bytes, reserve_bytes)
    stages = [_stage(shape, lay, train, s, rollout, on_train_gpu, resident or {}, reserve_bytes) for s in range(lay.pp)]
    return MemoryPlan(stages=stages, capacity=gpu_bytes, rollout_node=rollout_node, problems=problems)


def _stage(
    shape: ModelShape,
    lay: Layout,
    train: TrainShape,
    s: int,
    rollout: RolloutShape | None,
    on_train_gpu: dict[str, float],
    resident: dict[str, float],
    reserve_bytes: float,
) -> StagePlan:
    """Pipeline stage s: its parameters, training state, activations, logits and rollout share, by part."""
    per_chunk = shape.num_hidden_layers // (lay.pp * lay.vpp)
    layers = _stage_layers(lay, per_chunk, s)
    vocab_rank = padded_vocab(shape.vocab_size, lay.tp) / lay.tp
    tokens = train.micro_batch_size * train.seq_length / lay.cp  # per micro-batch on this GPU
    last = s == lay.pp - 1
    dense, expert = _stage_params(shape, lay, s, layers, vocab_rank)
    in_flight = _in_flight_chunks(lay, train, s)
    acts = _activation_bytes(shape, lay, train, layers, per_chunk, in_flight, tokens)
    rows = min(train.logits_chunk_tokens, tokens) if train.logits_chunk_tokens else tokens
    logits = rows * vocab_rank * train.logits_bytes_per_entry if last else 0.0

    parts = _training_state(lay, train, dense, expert)
    parts[f"activations ({in_flight} x {per_chunk} layers in flight, recompute={train.recompute})"] = acts
    if train.reference_model:
        parts["reference model for KL (frozen copy)"] = parts[f"weights ({train.dtype})"]
    parts.update(resident)
    if last:
        parts[f"logits ({int(rows)} tokens at a time x {int(vocab_rank)} vocab/GPU)"] = logits
    parts.update(_rollout_on_stage(shape, lay, rollout, on_train_gpu, acts, logits))
    parts["runtime reserve (CUDA context, NCCL buffers, fragmentation)"] = reserve_bytes
    return StagePlan(stage=s, params=dense + expert, parts=parts)


def _stage_layers(lay: Layout, per_chunk: int, s: int) -> list[int]:
    """Decoder layers on stage s: with interleaving, stage s holds chunks s, s + pp, s + 2 pp, ..."""
    chunks = lay.pp * lay.vpp
    return [c * per_chunk + j for c in range(s, chunks, lay.pp) for j in range(per_chunk)]


def _stage_params(shape: ModelShape, lay: Layout, s: int, layers: list[int], vocab_rank: float) -> tuple[float, float]:
    """(dense, expert) parameters on one GPU of stage s, the embedding and LM head included."""
    h = shape.hidden_size
    dense = expert = 0.0
    for i in layers:
        d, e = layer_params(shape, i, lay)
        dense, expert = dense + d, expert + e
    if s == 0:
        dense += vocab_rank * h  # input embedding
    if s == lay.pp - 1:
        dense += h  # final norm
        # untied: own LM head; tied with PP > 1: Megatron keeps a synchronised copy on the last stage
        if not shape.tie_word_embeddings or lay.pp > 1:
            dense += vocab_rank * h
    return dense, expert


def _in_flight_chunks(lay: Layout, train: TrainShape, s: int) -> int:
    """Model chunks whose activations stage s holds at its peak."""
    # 1F1B keeps (warm-up + 1) micro-batches in flight on stage s; interleaving adds chunks.
    if lay.vpp > 1:
        in_flight = (lay.pp - s - 1) * 2 + (lay.vpp - 1) * lay.pp + 1
    else:
        in_flight = lay.pp - s
    if train.num_microbatches:
        in_flight = min(in_flight, train.num_microbatches * lay.vpp)
    return in_flight


def _activation_bytes(
    shape: ModelShape, lay: Layout, train: TrainShape, layers: list[int], per_chunk: int, in_flight: int, tokens: float
) -> float:
    """Activation bytes stage s keeps for backward with `in_flight` chunks' micro-batches outstanding."""
    if train.recompute == "full":
        hs = lay.tp if (lay.sp and lay.tp > 1) else 1
        kept = BF16 * shape.hidden_size / hs * tokens * per_chunk  # only each layer's input is kept
        work = max(layer_act_bytes_per_token(shape, i, lay, train) for i in layers) * tokens
        return in_flight * kept + work  # plus one layer re-run during backward
    chunk_layers = layers[:per_chunk]  # chunks of a stage have equal layer counts
    per_layer = sum(layer_act_bytes_per_token(shape, i, lay, train) for i in chunk_layers)
    return in_flight * (per_layer * tokens)


def _training_state(lay: Layout, train: TrainShape, dense: float, expert: float) -> dict[str, float]:
    """Weights, gradients and optimizer state of this GPU's parameters, by part."""
    params = dense + expert
    w_b = FP32 if train.dtype == "fp32" else BF16
    grad_b = FP32 if train.grads_fp32 else w_b
    states = 2 if train.dtype == "fp32" else 3  # Adam m, v (+ fp32 master weights)
    what = "Adam m, v" if states == 2 else "fp32 master + Adam m, v"
    if lay.distributed_optimizer:
        opt = states * FP32 * (dense / (lay.dp * lay.cp) + expert / lay.expert_dp)
        opt_name = f"optimizer ({what}; sharded over DP={lay.dp * lay.cp})"
    else:
        opt = states * FP32 * params
        opt_name = f"optimizer ({what}; not sharded)"
    return {
        f"weights ({train.dtype})": w_b * params,
        f"gradients ({'fp32 main_grad' if train.grads_fp32 else train.dtype})": grad_b * params,
        opt_name: opt,
    }


def _rollout_on_stage(
    shape: ModelShape,
    lay: Layout,
    rollout: RolloutShape | None,
    on_train_gpu: dict[str, float],
    acts: float,
    logits: float,
) -> dict[str, float]:
    """The rollout engine's and weight sync's parts on a training GPU that peaks at acts + logits in training."""
    if rollout is not None and rollout.sleeps and on_train_gpu:
        # The engine sleeps while the trainer steps: the peak is the largest of three phases, training
        # (activations, logits), rollout (engine awake) and the weight sync (engine weights awake, one
        # bucket and one layer gathered from the shards).
        awake = sum(on_train_gpu.values())
        sync = on_train_gpu.get(ENGINE_WEIGHTS, awake) + refit_bytes(shape, lay, rollout)
        name = f"rollout engine, weight sync ({awake / GIB:.1f} / {sync / GIB:.1f} GiB) beyond activations"
        return {name: max(0.0, awake - acts - logits, sync - acts - logits)}
    parts = dict(on_train_gpu)
    if rollout is not None and rollout.mode == "colocated":
        parts["weight sync (one bucket + one layer gathered over TP)"] = refit_bytes(shape, lay, rollout)
    return parts


def check(p: MemoryPlan) -> None:
    """Raise DoesNotFit, listing every part, when the plan needs more than the GPU has."""
    if not p.fits:
        w = p.worst
        over = max(w.total - p.capacity, sum((p.rollout_node or {}).values()) - p.capacity)
        head = (
            f"layout does not fit the GPU (short by {over / GIB:.2f} GiB):"
            if over > 0
            else "layout does not fit the GPU:"
        )
        raise DoesNotFit(
            "\n".join([head, *p.problems, p.describe()])
            + "\nuse more tensor/pipeline parallelism, the distributed optimizer, "
            "recompute, a smaller micro-batch, or less rollout memory"
        )


# Public config.json values, used when model.hf_path is a hub id that is not on this disk (e.g. a
# plan made on a login node before the download). A local folder's config.json always wins.
_QWEN3 = dict(vocab_size=151936, head_dim=128, num_key_value_heads=8)
KNOWN_SHAPES: dict[str, dict] = {
    "Qwen/Qwen3-0.6B": dict(
        _QWEN3,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen3-1.7B": dict(
        _QWEN3,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen3-4B": dict(
        _QWEN3,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen3-8B": dict(
        _QWEN3,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen3-30B-A3B": dict(
        _QWEN3,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    # POLAR reward models (InternLM2 backbones; the planner counts an LM head they do not have: a slight over-count)
    "internlm/POLAR-1_8B": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=92544,
        tie_word_embeddings=False,
    ),
    "internlm/POLAR-7B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=92544,
        tie_word_embeddings=False,
    ),
}


def known_shape(hf_path: str) -> tuple[str, dict] | None:
    """The built-in config for a hub id, or for a folder named like one (".../Qwen3-8B")."""
    if hf_path in KNOWN_SHAPES:
        return hf_path, KNOWN_SHAPES[hf_path]
    name = hf_path.rstrip("/").rsplit("/", 1)[-1].lower()
    for hub_id, cfg in KNOWN_SHAPES.items():
        if hub_id.rsplit("/", 1)[-1].lower() == name:
            return hub_id, cfg
    return None
