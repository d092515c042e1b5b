"""What each part of a training GPU's memory costs: the planner's inputs and per-component estimators.

The inputs are a HF Qwen3 / Qwen3-MoE config.json (`ModelShape`), a Megatron parallel layout (`Layout`), the
micro-batch (`TrainShape`) and the rollout engine (`RolloutShape`). The estimators count one decoder layer's
parameters and the activations it keeps, the rollout engine's shard and the weight sync's working set;
uniapl_megatron.plan_memory sums them per pipeline stage and judges the fit.

The formulas are derived for pre-norm Qwen3 layers (GQA, q/k RMSNorm, SwiGLU, no dropout, no bias)
the way Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models")
count activations; they are estimates (no allocator caching, average MoE routing).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
BF16 = 2
FP32 = 4


class PlanError(ValueError):
    """A layout or model config that is inconsistent (the message names the numbers)."""


@dataclass(frozen=True)
class ModelShape:
    """The fields of a HF Qwen3 / Qwen3-MoE config.json that memory depends on."""

    hidden_size: int  # h
    num_hidden_layers: int  # L
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # GQA key/value heads
    head_dim: int  # per-head width (Qwen3-0.6B: 128, not hidden/heads)
    intermediate_size: int  # dense SwiGLU width
    vocab_size: int  # before Megatron's padding
    tie_word_embeddings: bool  # LM head shares the input embedding
    num_experts: int = 0  # 0 = dense model
    num_experts_per_tok: int = 0  # top-k routing
    moe_intermediate_size: int = 0  # SwiGLU width of one expert
    decoder_sparse_step: int = 1  # every n-th layer is MoE (Qwen3-MoE rule)
    mlp_only_layers: tuple[int, ...] = ()  # layers that stay dense in a MoE model

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelShape":
        """Read a config.json dict; a missing or wrongly typed field names `source` and the field."""
        if not isinstance(cfg, dict):
            raise PlanError(f"{source}: expected a JSON object, got {type(cfg).__name__}")

        def req(key: str, kind: type = int):
            if key not in cfg:
                raise PlanError(f"{source}: missing field '{key}' (needed for the memory plan)")
            val = cfg[key]
            if kind is int and (isinstance(val, bool) or not isinstance(val, int) or val <= 0):
                raise PlanError(f"{source}: field '{key}' must be a positive integer, got {val!r}")
            return val

        heads = req("num_attention_heads")
        hidden = req("hidden_size")
        head_dim = cfg.get("head_dim") or hidden // heads
        num_experts = int(cfg.get("num_experts") or 0)
        shape = cls(
            hidden_size=hidden,
            num_hidden_layers=req("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            intermediate_size=req("intermediate_size"),
            vocab_size=req("vocab_size"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=num_experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
            decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
        )
        if num_experts and (shape.num_experts_per_tok <= 0 or shape.moe_intermediate_size <= 0):
            raise PlanError(
                f"{source}: num_experts={num_experts} needs positive 'num_experts_per_tok' and 'moe_intermediate_size'"
            )
        return shape

    def is_moe_layer(self, i: int) -> bool:
        """Qwen3-MoE's rule for which decoder layers have experts."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class Layout:
    """A Megatron parallel layout on `world_size` training GPUs (the `parallel:` config section)."""

    world_size: int  # training GPUs (disaggregated rollout nodes excluded)
    tp: int = 1  # tensor_model_parallel_size
    pp: int = 1  # pipeline_model_parallel_size
    vpp: int = 1  # virtual_pipeline_model_parallel_size (model chunks per stage)
    cp: int = 1  # context_parallel_size
    ep: int = 1  # expert_model_parallel_size
    etp: int | None = None  # expert_tensor_parallel_size; None = tp (Megatron's default)
    sp: bool = False  # sequence_parallel (only matters when tp > 1)
    distributed_optimizer: bool = True  # use_distributed_optimizer: shard fp32 state over DP

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def expert_dp(self) -> int:
        return self.world_size // (self.pp * self.ep * self.expert_tp)


@dataclass(frozen=True)
class TrainShape:
    """What one training micro-batch looks like and how activations are kept."""

    micro_batch_size: int = 1  # sequences per micro-batch
    seq_length: int = 4096  # tokens per (packed) sequence
    recompute: str = "none"  # none | selective (core attention) | full (whole layers)
    num_microbatches: int | None = None  # per step and DP rank; None = enough to fill the pipeline
    flash_attention: bool = True  # fused attention (SDPA/flash/TE): no seq x seq score matrix kept
    # sdpa: the torch-native spec (torch SDPA expands GQA's K/V to every head and the projection
    # gets a copy of its output; measured on an H100); te: Transformer Engine's attention (neither).
    attention: str = "sdpa"
    dtype: str = "bf16"  # bf16 | fp16 (fp32 master weights in the optimizer) | fp32 (none)
    grads_fp32: bool = True  # Megatron keeps bf16 models' grads in fp32 main_grad buffers
    reference_model: bool = False  # a frozen copy of the student for the KL term, sharded alike
    logits_chunk_tokens: int = 0  # log-probs computed this many tokens at a time; 0 = all at once
    # Peak bytes per logit entry, forward + backward: bf16 logits -> fp32 log-softmax -> gather
    # measured 11.7 on an H100 (a fused vocab-parallel cross-entropy needs ~8).
    logits_bytes_per_entry: float = 12.0


@dataclass(frozen=True)
class RolloutShape:
    """The rollout engine's claim on GPU memory (the `rollout:` config section)."""

    engine: str = "vllm"  # vllm | torch (the non-vLLM fallback)
    mode: str = "colocated"  # colocated (same GPUs as training) | disaggregated (own nodes)
    tensor_parallel_size: int = 1  # the engine's own TP
    gpu_memory_utilization: float = 0.3  # vLLM's fraction of the whole GPU
    num_nodes: int = 0  # disaggregated: the last num_nodes nodes run the engines, one per TP group of GPUs
    max_num_seqs: int = 64  # fallback engine: sequences decoded at once (its KV cache)
    max_model_len: int = 4096  # fallback engine: prompt + response tokens per sequence
    dtype_bytes: int = 2  # bytes per value of the engine's weights and KV cache
    sleeps: bool = True  # colocated engine frees its memory while the trainer steps (sleep/wake)
    kv_cache_bytes: int = 0  # vLLM's KV cache per engine shard (rollout.kv_cache_bytes); 0 = from the fraction
    bucket_bytes: int = 256 << 20  # weight-sync bucket (rollout.bucket_bytes)
    gpus_per_node: int = 8  # disaggregated: rollout GPUs per node, one engine shard each


def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of divisible_by * tp."""
    m = divisible_by * tp
    return -(-vocab // m) * m


def validate(shape: ModelShape, lay: Layout, train: TrainShape) -> None:
    """Raise PlanError naming the numbers that disagree."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise PlanError(msg)

    for name, v in (
        ("tensor_model_parallel_size", lay.tp),
        ("pipeline_model_parallel_size", lay.pp),
        ("virtual_pipeline_model_parallel_size", lay.vpp),
        ("context_parallel_size", lay.cp),
        ("expert_model_parallel_size", lay.ep),
    ):
        need(isinstance(v, int) and v >= 1, f"parallel.{name} must be an integer >= 1, got {v!r}")
    mp = lay.tp * lay.pp * lay.cp
    need(
        lay.world_size % mp == 0,
        f"{lay.world_size} training GPUs are not divisible by tensor x pipeline x context parallel "
        f"= {lay.tp} x {lay.pp} x {lay.cp} = {mp}",
    )
    need(
        shape.num_attention_heads % lay.tp == 0,
        f"num_attention_heads={shape.num_attention_heads} is not divisible by tensor_model_parallel_size={lay.tp}",
    )
    kv = shape.num_key_value_heads
    need(
        kv % lay.tp == 0 or lay.tp % kv == 0,
        f"num_key_value_heads={kv} and tensor_model_parallel_size={lay.tp}: one must divide the other",
    )
    need(lay.vpp == 1 or lay.pp > 1, "virtual pipeline stages need pipeline_model_parallel_size > 1")
    chunks = lay.pp * lay.vpp
    need(
        shape.num_hidden_layers % chunks == 0,
        f"num_hidden_layers={shape.num_hidden_layers} is not divisible by pipeline x virtual "
        f"pipeline stages = {lay.pp} x {lay.vpp} = {chunks}",
    )
    need(
        train.recompute in ("none", "selective", "full"),
        f"recompute must be none, selective or full, got {train.recompute!r}",
    )
    need(train.attention in ("sdpa", "te"), f"attention must be sdpa or te, got {train.attention!r}")
    need(train.dtype in ("bf16", "fp16", "fp32"), f"dtype must be bf16, fp16 or fp32, got {train.dtype!r}")
    need(
        lay.cp == 1 or train.seq_length % (2 * lay.cp) == 0,
        f"seq_length={train.seq_length} is not divisible by 2 x context_parallel_size={lay.cp}",
    )
    if shape.num_experts:
        need(
            shape.num_experts % lay.ep == 0,
            f"num_experts={shape.num_experts} is not divisible by expert_model_parallel_size={lay.ep}",
        )
        emp = lay.pp * lay.ep * lay.expert_tp
        need(
            lay.world_size % emp == 0,
            f"{lay.world_size} training GPUs are not divisible by pipeline x expert x expert-tensor "
            f"parallel = {lay.pp} x {lay.ep} x {lay.expert_tp} = {emp}",
        )
    else:
        need(lay.ep == 1, f"expert_model_parallel_size={lay.ep} needs a MoE model (num_experts > 0)")


def layer_params(shape: ModelShape, i: int, lay: Layout) -> tuple[float, float]:
    """(dense, expert) parameter counts of decoder layer i on one GPU."""
    h, d = shape.hidden_size, shape.head_dim
    kv_heads = max(shape.num_key_value_heads // lay.tp, 1)  # TP > kv heads replicates them
    attn = h * shape.q_width // lay.tp + 2 * h * kv_heads * d + shape.q_width // lay.tp * h
    norms = 2 * h + 2 * d  # input/post-attention RMSNorm, q/k RMSNorm: replicated on every TP rank
    if not shape.is_moe_layer(i):
        return attn + norms + 3 * h * shape.intermediate_size / lay.tp, 0.0
    router = h * shape.num_experts  # replicated
    experts = (shape.num_experts // lay.ep) * 3 * h * shape.moe_intermediate_size / lay.expert_tp
    return attn + norms + router, experts


def layer_act_bytes_per_token(shape: ModelShape, i: int, lay: Layout, train: TrainShape) -> float:
    """Bytes one decoder layer keeps for backward, per token on this GPU (no recompute)."""
    h, t = shape.hidden_size, lay.tp
    hs = t if (lay.sp and t > 1) else 1  # sequence parallel splits the hidden-size tensors over TP
    q = shape.q_width / t
    kv = max(shape.num_key_value_heads // t, 1) * shape.head_dim
    heads = shape.num_attention_heads / t
    # attention: norm input, QKV input (h-sized); QKV output = q/k-norm input, roped q and k,
    # attention output = projection input, fp32 softmax statistics (per head).
    attn = 2 * BF16 * h / hs + BF16 * ((q + 2 * kv) + (q + kv) + q) + FP32 * heads
    if train.attention == "sdpa":
        attn += BF16 * (2 * (q - kv) + q)  # K, V expanded to all query heads; output copy
    if not train.flash_attention and train.recompute == "none":
        attn += BF16 * heads * train.seq_length / lay.cp  # softmax probabilities (seq x seq)
    if not shape.is_moe_layer(i):
        ffn = shape.intermediate_size / t
        # norm input, fc1 input (h-sized); gate|up output, SwiGLU output.
        mlp = 2 * BF16 * h / hs + BF16 * (2 * ffn + ffn)
    else:
        k, ffn = shape.num_experts_per_tok, shape.moe_intermediate_size / lay.expert_tp
        # norm input, router input, fp32 router logits; per routed copy: permuted input,
        # gate|up and SwiGLU outputs, expert output (for the weighted combine). Average routing.
        mlp = (2 * BF16 * h + FP32 * shape.num_experts) / hs + k * (BF16 * 2 * h + BF16 * 3 * ffn)
    return attn + mlp


def param_count(shape: ModelShape, tp: int = 1) -> float:
    """Parameters of the whole model on one GPU of `tp` (experts split over the same TP)."""
    flat = Layout(world_size=tp, tp=tp)
    params = sum(sum(layer_params(shape, i, flat)) for i in range(shape.num_hidden_layers))
    emb = padded_vocab(shape.vocab_size, tp) / tp * shape.hidden_size
    return params + emb * (1 if shape.tie_word_embeddings else 2) + shape.hidden_size


# The rollout part that stays awake through a weight sync (plan_memory looks it up by this name).
ENGINE_WEIGHTS = "rollout engine weights"


def refit_bytes(shape: ModelShape, lay: Layout, r: RolloutShape) -> float:
    """What a training GPU holds for a weight sync (rollout/refit_held_mib measures it on CPU): one bucket of
    a pipeline stage's tensors, plus one decoder layer gathered whole over TP (or the vocab-sized embedding,
    when larger)."""
    flat = Layout(world_size=1)
    layer = max(sum(layer_params(shape, i, flat)) for i in range(shape.num_hidden_layers))
    emb = padded_vocab(shape.vocab_size, 1) * shape.hidden_size
    return r.bucket_bytes + r.dtype_bytes * max(layer, emb)


def rollout_parts(
    shape: ModelShape, r: RolloutShape | None, gpu_bytes: float, reserve: float
) -> tuple[dict[str, float], dict[str, float] | None, list[str]]:
    """(parts on a training GPU, parts on a rollout-node GPU or None, problems). Colocated: every training
    GPU holds its shard of one engine (one per rollout-TP group of ranks); disaggregated: every rollout GPU
    does, and the training GPUs hold none."""
    if r is None:
        return {}, None, []
    if r.engine not in ("vllm", "torch"):
        raise PlanError(f"rollout.engine must be vllm or torch, got {r.engine!r}")
    if r.mode not in ("colocated", "disaggregated"):
        raise PlanError(f"rollout.mode must be colocated or disaggregated, got {r.mode!r}")
    tp = r.tensor_parallel_size
    if shape.num_attention_heads % tp:
        raise PlanError(
            f"rollout.tensor_parallel_size={tp} does not divide num_attention_heads={shape.num_attention_heads}"
        )
    weights = r.dtype_bytes * param_count(shape, tp)
    problems = []
    if r.engine == "vllm" and not r.kv_cache_bytes:
        if r.mode == "colocated":
            raise PlanError(
                "rollout.kv_cache_bytes: a colocated engine shares its GPU with training; set its KV "
                "cache in bytes (the trainer refuses 0 too)"
            )
        if not 0.0 < r.gpu_memory_utilization < 1.0:
            raise PlanError(f"rollout.gpu_memory_utilization must be in (0, 1), got {r.gpu_memory_utilization}")
        share = r.gpu_memory_utilization * gpu_bytes
        if weights >= share:
            problems.append(
                f"rollout: vLLM's share (gpu_memory_utilization={r.gpu_memory_utilization} of "
                f"{gpu_bytes / GIB:.2f} GiB = {share / GIB:.2f} GiB) cannot hold its weights "
                f"({weights / GIB:.2f} GiB at tensor_parallel_size={tp}) and a KV cache"
            )
        parts = {f"rollout engine (vLLM, gpu_memory_utilization={r.gpu_memory_utilization})": share}
    elif r.engine == "vllm":
        parts = {
            ENGINE_WEIGHTS: weights,
            f"rollout KV cache (vLLM, rollout.kv_cache_bytes, TP={tp})": float(r.kv_cache_bytes),
        }
        budget = r.gpu_memory_utilization * gpu_bytes
        if weights + r.kv_cache_bytes > budget:  # vLLM refuses a KV cache beyond its own budget at start-up
            problems.append(
                f"rollout: weights ({weights / GIB:.2f} GiB) + kv_cache_bytes "
                f"({r.kv_cache_bytes / GIB:.2f} GiB) exceed vLLM's start-up budget, "
                f"gpu_memory_utilization={r.gpu_memory_utilization} of the GPU ({budget / GIB:.2f} GiB)"
            )
    else:
        kv_heads = max(shape.num_key_value_heads // tp, 1)
        kv = r.max_num_seqs * r.max_model_len * shape.num_hidden_layers * 2 * kv_heads * shape.head_dim * r.dtype_bytes
        parts = {
            ENGINE_WEIGHTS: weights,
            f"rollout KV cache (torch engine, {r.max_num_seqs} seqs x {r.max_model_len} tokens)": kv,
        }
    if r.mode == "colocated":
        return parts, None, problems
    node = dict(parts)
    node["runtime reserve (CUDA context, NCCL buffers, fragmentation)"] = reserve
    return {}, node, problems
