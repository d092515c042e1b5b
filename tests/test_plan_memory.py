"""The per-GPU memory planner on Qwen3-0.6B / 4B / 8B (and 30B-A3B MoE) shapes.

Weight counts are written out by hand from the public config.json values below, layer by layer,
so a wrong formula in the planner cannot also be the expected value.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from uniapl_megatron.plan_memory import (
    GIB,
    KNOWN_SHAPES,
    DoesNotFit,
    Layout,
    ModelShape,
    PlanError,
    RolloutShape,
    TrainShape,
    check,
    known_shape,
    param_count,
    plan,
)

ROOT = Path(__file__).resolve().parents[1]
H100 = 79.6 * GIB
RECIPES = ["qwen3_0p6b_32x8", "qwen3_4b_32x8", "qwen3_8b_32x8"]


def _tool():
    """tools/plan_memory.py (the recipe reader and CLI) as a module."""
    spec = importlib.util.spec_from_file_location("plan_memory_tool", ROOT / "tools" / "plan_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool = _tool()

# Public config.json values (huggingface.co/Qwen/Qwen3-*/config.json).
QWEN3_0P6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
)
QWEN3_4B = dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
)
QWEN3_8B = dict(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=False,
)
QWEN3_30B_A3B = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=False,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)

NO_ROLLOUT = RolloutShape(mode="disaggregated", num_nodes=1)  # nothing on the training GPUs


def shape(cfg: dict) -> ModelShape:
    return ModelShape.from_hf_config(dict(cfg), "test config.json")


def weights(cfg, **lay) -> list[float]:
    """bf16 weight bytes per pipeline stage."""
    p = plan(shape(cfg), Layout(**lay), TrainShape(), NO_ROLLOUT, H100)
    return [s.parts["weights (bf16)"] for s in p.stages]


def test_known_shapes_are_the_public_configs():
    assert KNOWN_SHAPES["Qwen/Qwen3-0.6B"] == QWEN3_0P6B
    assert KNOWN_SHAPES["Qwen/Qwen3-4B"] == QWEN3_4B
    assert KNOWN_SHAPES["Qwen/Qwen3-8B"] == QWEN3_8B
    assert KNOWN_SHAPES["Qwen/Qwen3-30B-A3B"] == QWEN3_30B_A3B


def test_weight_bytes_single_gpu_match_published_parameter_counts():
    # 0.6B: embedding 151936 x 1024; per layer q 1024x2048, k and v 1024x1024, o 2048x1024,
    # q/k norms 2 x 128, two RMSNorms 2 x 1024, SwiGLU 3 x 1024x3072; final norm 1024; tied head.
    layer = 1024 * 2048 + 2 * 1024 * 1024 + 2048 * 1024 + 2 * 128 + 2 * 1024 + 3 * 1024 * 3072
    n = 151936 * 1024 + 28 * layer + 1024
    assert n == 596_049_920
    assert weights(QWEN3_0P6B, world_size=1) == [2 * n]
    # 4B: q 2560x4096, k/v 2560x1024, o 4096x2560, SwiGLU 3 x 2560x9728; tied head.
    layer = 2560 * 4096 + 2 * 2560 * 1024 + 4096 * 2560 + 2 * 128 + 2 * 2560 + 3 * 2560 * 9728
    n = 151936 * 2560 + 36 * layer + 2560
    assert n == 4_022_468_096
    assert weights(QWEN3_4B, world_size=1) == [2 * n]
    # 8B: q 4096x4096, k/v 4096x1024, o 4096x4096, SwiGLU 3 x 4096x12288; untied head.
    layer = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 2 * 128 + 2 * 4096 + 3 * 4096 * 12288
    n = 2 * 151936 * 4096 + 36 * layer + 4096
    assert n == 8_190_735_360
    assert weights(QWEN3_8B, world_size=1) == [2 * n]


def test_weight_bytes_under_tensor_and_pipeline_parallelism():
    # 8B at TP=2: vocab padded to a multiple of 128 x 2 = 256 -> 152064, half per rank;
    # projections and SwiGLU halved, the four norms replicated.
    layer = (4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 12288) // 2 + 2 * 128 + 2 * 4096
    n = 2 * (152064 // 2) * 4096 + 36 * layer + 4096
    assert weights(QWEN3_8B, world_size=2, tp=2) == [2 * n]
    # 4B at TP=4: 151936 -> 152064 (multiple of 512), a quarter per rank; tied: one copy.
    layer = (2560 * 4096 + 2 * 2560 * 1024 + 4096 * 2560 + 3 * 2560 * 9728) // 4 + 2 * 128 + 2 * 2560
    assert weights(QWEN3_4B, world_size=4, tp=4) == [2 * ((152064 // 4) * 2560 + 36 * layer + 2560)]
    # 0.6B at PP=2: 14 layers per stage; embedding on stage 0; stage 1 keeps the final norm and,
    # because the head is tied and PP > 1, a copy of the embedding as its output layer.
    layer = 1024 * 2048 + 2 * 1024 * 1024 + 2048 * 1024 + 2 * 128 + 2 * 1024 + 3 * 1024 * 3072
    assert weights(QWEN3_0P6B, world_size=2, pp=2) == [
        2 * (151936 * 1024 + 14 * layer),
        2 * (14 * layer + 1024 + 151936 * 1024),
    ]


def test_moe_weights_split_experts_over_ep():
    attn = 2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 2 * 128 + 2 * 2048
    router = 2048 * 128
    expert = 3 * 2048 * 768
    emb = 151936 * 2048
    total = 2 * emb + 48 * (attn + router + 128 * expert) + 2048
    assert total == 30_532_122_624  # the published 30.5B
    assert weights(QWEN3_30B_A3B, world_size=1) == [2 * total]
    # EP=8: 16 experts per rank; attention, router and norms on every rank.
    assert weights(QWEN3_30B_A3B, world_size=8, ep=8) == [2 * (2 * emb + 48 * (attn + router + 16 * expert) + 2048)]


def test_gradients_and_optimizer_follow_megatron_bytes_per_parameter():
    s, lay = shape(QWEN3_8B), Layout(world_size=64, tp=2, distributed_optimizer=False)
    p = plan(s, lay, TrainShape(), NO_ROLLOUT, H100).stages[0]
    n = p.params
    per_param = {k.split(" ")[0]: v / n for k, v in p.parts.items()}
    # bf16 weights 2 + fp32 main_grad 4 + fp32 master, Adam m, v 12 = 18 bytes per parameter.
    assert per_param == pytest.approx(
        {
            "weights": 2,
            "gradients": 4,
            "optimizer": 12,
            "activations": per_param["activations"],
            "logits": per_param["logits"],
            "runtime": per_param["runtime"],
        }
    )
    # Distributed optimizer: 6 + 12/d with d = 32 data-parallel ranks.
    p = plan(s, Layout(world_size=64, tp=2), TrainShape(), NO_ROLLOUT, H100).stages[0]
    opt = next(v for k, v in p.parts.items() if k.startswith("optimizer"))
    assert opt == pytest.approx(12 * n / 32)


def test_activation_bytes_by_hand_and_their_parallel_behaviour():
    s = shape(QWEN3_0P6B)
    train = TrainShape(micro_batch_size=1, seq_length=4096)
    p = plan(s, Layout(world_size=1), train, NO_ROLLOUT, H100).stages[0]
    # per token per layer: attention 2 x 2h (norm and QKV inputs) + 2 x (q + 2kv) (QKV out)
    # + 2 x (q + kv) (roped q, k) + 2q (attention out) + 4 x heads (fp32 softmax stats),
    # + torch SDPA's K/V expanded to all heads 2 x 2 x (q - kv) and the output copy 2q;
    # MLP 2 x 2h + 2 x 3 x ffn.  h=1024, q=2048, kv=1024, heads=16, ffn=3072.
    te_attn = 4 * 1024 + 2 * (2048 + 2 * 1024) + 2 * (2048 + 1024) + 2 * 2048 + 4 * 16
    attn = te_attn + 4 * (2048 - 1024) + 2 * 2048
    mlp = 4 * 1024 + 6 * 3072
    acts = next(v for k, v in p.parts.items() if k.startswith("activations"))
    assert acts == (attn + mlp) * 28 * 4096
    logits = next(v for k, v in p.parts.items() if k.startswith("logits"))
    assert logits == 4096 * 151936 * 12  # 11.7 bytes per entry measured on an H100
    te = plan(s, Layout(world_size=1), replace(train, attention="te"), NO_ROLLOUT, H100).stages[0]
    assert next(v for k, v in te.parts.items() if k.startswith("activations")) == (te_attn + mlp) * 28 * 4096

    def act(**lay):
        q = plan(s, Layout(**lay), train, NO_ROLLOUT, H100).stages[0]
        return next(v for k, v in q.parts.items() if k.startswith("activations"))

    # 1F1B: stage 0 of PP=2 keeps 2 micro-batches of 14 layers = the PP=1 amount.
    assert act(world_size=2, pp=2) == pytest.approx(acts)
    # Interleaving (vpp=2, pp=2): (pp-1)*2 + (vpp-1)*pp + 1 = 5 chunks of 7 layers in flight.
    assert act(world_size=2, pp=2, vpp=2) == pytest.approx(acts * 5 * 7 / 28)
    tp2, tp2_sp = act(world_size=2, tp=2), act(world_size=2, tp=2, sp=True)
    assert tp2_sp < tp2 < acts and tp2_sp == pytest.approx(acts / 2)
    full = plan(s, Layout(world_size=1), TrainShape(seq_length=4096, recompute="full"), NO_ROLLOUT, H100).stages[0]
    kept = next(v for k, v in full.parts.items() if k.startswith("activations"))
    assert kept == 2 * 1024 * 4096 * 28 + (attn + mlp) * 4096  # layer inputs + one layer re-run
    assert act(world_size=2, cp=2) == pytest.approx(acts / 2)


def test_colocated_engine_shard_weight_sync_and_fallback_kv_cache():
    # Qwen3-4B at rollout TP=1: the engine's shard on every training GPU is its bf16 weights plus the KV
    # cache in bytes; asleep during training, the peak is the largest of the training, rollout and sync
    # phases (sync: engine weights + one 256 MiB bucket + the largest unit gathered whole, here the
    # 151,936 x 2,560 embedding, which outweighs one layer's 100.9M parameters).
    s, lay = shape(QWEN3_4B), Layout(world_size=8, tp=2, sp=True)
    train = TrainShape(seq_length=8192)
    kv = 12 * GIB
    engine_weights = 2 * 4_022_468_096
    awake = plan(s, lay, train, RolloutShape(kv_cache_bytes=kv, sleeps=False), H100)
    asleep = plan(s, lay, train, RolloutShape(kv_cache_bytes=kv), H100)
    base = plan(s, lay, train, NO_ROLLOUT, H100)
    st, sl, b = awake.stages[0], asleep.stages[0], base.stages[0]
    sync = 256 * 2**20 + 2 * 151_936 * 2560
    assert st.total - b.total == pytest.approx(engine_weights + kv + sync)
    step = sum(v for k, v in b.parts.items() if k.startswith(("activations", "logits")))
    assert sl.total - b.total == pytest.approx(max(0.0, engine_weights + kv - step, engine_weights + sync - step))
    # vLLM's start-up budget (gpu_memory_utilization of the GPU) must hold what it is told to allocate.
    tight = plan(s, lay, train, RolloutShape(kv_cache_bytes=kv, gpu_memory_utilization=0.2), H100)
    assert not tight.fits and "exceed vLLM's start-up budget" in tight.problems[0]
    # A colocated vLLM engine sized by a fraction of the GPU is refused (the trainer refuses it too).
    with pytest.raises(PlanError, match="rollout.kv_cache_bytes"):
        plan(s, lay, train, RolloutShape(gpu_memory_utilization=0.35), H100)
    # torch fallback at TP=1: full bf16 weights + KV cache of 32 seqs x 4096 tokens:
    # 36 layers x (K and V) x 8 kv heads x 128 x 2 bytes per token.
    fb = plan(
        s, lay, train, RolloutShape(engine="torch", max_num_seqs=32, max_model_len=4096, sleeps=False), H100
    ).stages[0]
    assert fb.parts["rollout KV cache (torch engine, 32 seqs x 4096 tokens)"] == 32 * 4096 * 36 * 2 * 8 * 128 * 2
    assert fb.parts["rollout engine weights"] == engine_weights


def test_engines_are_counted_and_unplaceable_layouts_refused(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(
        "model: {hf_path: Qwen/Qwen3-8B}\nparallel: {tensor_model_parallel_size: 4}\n"
        "rollout: {tensor_parallel_size: 2, kv_cache_bytes: 1073741824}\n"
    )
    cfg = tool.load_recipe(str(f))
    _, notes = tool.plan_recipe(cfg, str(f), 4, 8, H100)
    assert "rollout: 16 colocated engine(s) of TP=2" in notes  # 32 GPUs / 2
    cfg = tool.load_recipe(str(f), ["rollout.mode=disaggregated", "rollout.num_nodes=2"])
    _, notes = tool.plan_recipe(cfg, str(f), 4, 8, H100)
    assert "rollout: 8 disaggregated engine(s) of TP=2" in notes  # every GPU of the 2 rollout nodes
    for bad, msg in (
        ("rollout.tensor_parallel_size=16", "would span two nodes"),
        ("rollout.tensor_parallel_size=3", "does not divide the 32 training ranks"),
    ):
        with pytest.raises(PlanError, match=msg):
            tool.plan_recipe(tool.load_recipe(str(f), [bad]), str(f), 4, 8, H100)


def test_a_layout_that_cannot_fit_is_refused_with_every_part_listed():
    # 8B without tensor parallelism: 15 GiB weights + 31 GiB fp32 grads + ~38 GiB activations.
    p = plan(
        shape(QWEN3_8B),
        Layout(world_size=256),
        TrainShape(seq_length=8192),
        RolloutShape(gpu_memory_utilization=0.35, kv_cache_bytes=8 * GIB),
        H100,
    )
    assert not p.fits
    with pytest.raises(DoesNotFit) as e:
        check(p)
    msg = str(e.value)
    for part in (
        "weights (bf16)",
        "gradients (fp32 main_grad)",
        "optimizer",
        "activations",
        "logits",
        "rollout engine",
        "runtime reserve",
        "total",
        "short by",
    ):
        assert part in msg, part
    assert "79.60 GiB" in msg
    # The same model at TP=4 with SP fits.
    check(
        plan(
            shape(QWEN3_8B),
            Layout(world_size=256, tp=4, sp=True),
            TrainShape(seq_length=8192),
            RolloutShape(gpu_memory_utilization=0.35, kv_cache_bytes=8 * GIB, tensor_parallel_size=2),
            H100,
        )
    )


def test_rollout_that_cannot_hold_its_weights_is_refused():
    p = plan(
        shape(QWEN3_8B),
        Layout(world_size=8, tp=4),
        TrainShape(),
        RolloutShape(gpu_memory_utilization=0.15, mode="disaggregated", num_nodes=1),
        H100,
    )
    assert p.worst.total < H100 and not p.fits
    with pytest.raises(DoesNotFit, match=r"vLLM's share .* cannot hold its weights \(15\.26 GiB"):
        check(p)
    disagg = plan(
        shape(QWEN3_8B),
        Layout(world_size=8, tp=4),
        TrainShape(),
        RolloutShape(engine="torch", mode="disaggregated", num_nodes=1, max_num_seqs=512, max_model_len=8192),
        H100,
    )
    assert not disagg.fits  # 512 x 8192 tokens of KV cache is 576 GiB
    with pytest.raises(DoesNotFit, match="rollout node GPU"):
        check(disagg)


@pytest.mark.parametrize(
    "cfg, lay, msg",
    [
        (
            QWEN3_0P6B,
            dict(world_size=3, tp=3),
            "num_attention_heads=16 is not divisible by tensor_model_parallel_size=3",
        ),
        (
            QWEN3_0P6B,
            dict(world_size=3, pp=3),
            "num_hidden_layers=28 is not divisible by pipeline x virtual pipeline stages = 3 x 1",
        ),
        (
            QWEN3_0P6B,
            dict(world_size=6, tp=4),
            "6 training GPUs are not divisible by tensor x pipeline x context parallel = 4 x 1 x 1",
        ),
        (QWEN3_0P6B, dict(world_size=2, ep=2), "expert_model_parallel_size=2 needs a MoE model"),
        (
            QWEN3_30B_A3B,
            dict(world_size=24, ep=24),
            "num_experts=128 is not divisible by expert_model_parallel_size=24",
        ),
        (QWEN3_0P6B, dict(world_size=2, vpp=2), "virtual pipeline stages need pipeline_model_parallel_size > 1"),
    ],
)
def test_inconsistent_layouts_name_the_numbers(cfg, lay, msg):
    with pytest.raises(PlanError, match=msg.replace("(", r"\(")):
        plan(shape(cfg), Layout(**lay), TrainShape(), NO_ROLLOUT, H100)


def test_bad_model_config_names_the_field():
    bad = dict(QWEN3_0P6B)
    del bad["vocab_size"]
    with pytest.raises(PlanError, match="cfg.json: missing field 'vocab_size'"):
        ModelShape.from_hf_config(bad, "cfg.json")
    with pytest.raises(PlanError, match="'hidden_size' must be a positive integer, got '1024'"):
        ModelShape.from_hf_config(dict(QWEN3_0P6B, hidden_size="1024"), "cfg.json")


def test_fp32_training_reference_model_and_resident_parts():
    s = shape(QWEN3_0P6B)
    n = 596_049_920
    p = plan(
        s,
        Layout(world_size=4),
        TrainShape(dtype="fp32", reference_model=True),
        None,
        H100,
        resident={"discriminator (frozen)": 3 * GIB},
    ).stages[0]
    assert p.parts["weights (fp32)"] == 4 * n
    assert p.parts["gradients (fp32 main_grad)"] == 4 * n
    assert p.parts["optimizer (Adam m, v; sharded over DP=4)"] == 8 * n / 4  # no master copy in fp32
    assert p.parts["reference model for KL (frozen copy)"] == 4 * n
    assert p.parts["discriminator (frozen)"] == 3 * GIB
    assert not any(k.startswith("rollout") for k in p.parts)  # no rollout section: no engine


def test_known_shape_by_hub_id_or_folder_name():
    assert known_shape("Qwen/Qwen3-8B")[0] == "Qwen/Qwen3-8B"
    assert known_shape("/cluster/models/qwen3-4b/")[0] == "Qwen/Qwen3-4B"
    assert known_shape("/cluster/models/llama") is None
    assert param_count(shape(QWEN3_8B)) == 8_190_735_360
