"""The fallback torch engine (no vLLM): correctness against a plain transformers forward, seeds, stops,
weight updates, the sampler's distribution, config errors."""

from __future__ import annotations

import math

import pytest
import torch
from _models import tiny_qwen3
from _reference import filtered, hf_greedy, hf_logprobs

from uniapl_megatron.rollout import RolloutConfig, RolloutConfigError, SamplingParams, build_engine
from uniapl_megatron.rollout.sampling import sample_next, seed_tensor
from uniapl_megatron.rollout.torch_engine import TorchRolloutEngine
from uniapl_megatron.rollout.weight_sync import WeightSyncError

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [250, 1, 2, 3], [40]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_qwen3(tmp_path_factory.mktemp("torch_rollout") / "m", tie=False, vocab=300, layers=2, hidden=64)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = build_engine(RolloutConfig(engine="torch", model_path=str(model_dir), max_model_len=128, max_batch_size=3))
    yield eng
    eng.shutdown()


def test_engine_is_the_torch_engine(engine):
    assert isinstance(engine, TorchRolloutEngine)


def test_greedy_matches_a_plain_forward_across_padding_and_batches(engine, hf):
    # 4 prompts of different lengths, batches of 3 rows: left padding and the batch split are both exercised.
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12))
    assert [s.prompt_index for s in out.samples] == [0, 1, 2, 3]
    for s, p in zip(out.samples, PROMPTS):
        assert s.token_ids == hf_greedy(hf, p, 12)
        assert s.finish_reason == "length"
        # Greedy reports log_softmax of the raw logits (vLLM's processed_logprobs does the same).
        ref = hf_logprobs(hf, p, s.token_ids, SamplingParams(temperature=1.0))
        assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-4)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 20, 0.9)])
def test_logprobs_are_those_of_the_sampled_distribution(engine, hf, temperature, top_k, top_p):
    params = SamplingParams(n=3, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=10, seed=11)
    out = engine.generate(PROMPTS, params)
    assert len(out.samples) == 12 and [len(out.for_prompt(i)) for i in range(4)] == [3, 3, 3, 3]
    worst = 0.0
    for s in out.samples:
        ref = hf_logprobs(hf, PROMPTS[s.prompt_index], s.token_ids, params)
        assert torch.isfinite(ref).all(), "a sampled token was outside the top-k / top-p set"
        worst = max(worst, float((torch.tensor(s.logprobs) - ref).abs().max()))
    assert worst <= 1e-4


def test_same_seed_same_samples_whatever_the_batch(engine, model_dir):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=5)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    # A sample depends on (seed, prompt index, sample index) only: not on the batch size or split.
    wide = TorchRolloutEngine(
        RolloutConfig(engine="torch", model_path=str(model_dir), max_model_len=128, max_batch_size=64)
    )
    c = wide.generate(PROMPTS, params)
    wide.shutdown()
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in c.samples]
    d = engine.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=6))
    assert [s.token_ids for s in a.samples] != [s.token_ids for s in d.samples]
    # The two samples of a prompt differ (their own seeds).
    assert a.samples[0].token_ids != a.samples[1].token_ids
    # A request for the last prompts, told where they start, draws what the whole request drew for them.
    tail = engine.generate(
        PROMPTS[2:], SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=5, prompt_index_offset=2)
    )
    assert [s.token_ids for s in tail.samples] == [s.token_ids for s in a.samples[4:]]


def test_stop_token_ends_a_sample(engine, hf):
    greedy = hf_greedy(hf, PROMPTS[0], 8)
    stop = greedy[3]
    first = greedy.index(stop)
    out = engine.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(stop,)))
    s0 = out.samples[0]
    assert s0.token_ids == greedy[: first + 1] and s0.finish_reason == "stop"
    assert len(s0.logprobs) == len(s0.token_ids)
    s1 = out.samples[1]
    assert (s1.finish_reason == "stop") == (stop in s1.token_ids)
    if s1.finish_reason == "length":
        assert len(s1.token_ids) == 8


def test_update_weights_in_place_and_back(model_dir, hf):
    eng = TorchRolloutEngine(
        RolloutConfig(engine="torch", model_path=str(model_dir), max_model_len=128, load_format="dummy")
    )
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in original.items()}
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    eng.update_weights(lambda: iter(original.items()))
    before = eng.generate(PROMPTS, params)
    assert [s.token_ids for s in before.samples] == [hf_greedy(hf, p, 10) for p in PROMPTS]
    eng.update_weights(iter(moved.items()))
    after = eng.generate(PROMPTS, params)
    hf.load_state_dict(moved)
    try:
        assert [s.token_ids for s in after.samples] == [hf_greedy(hf, p, 10) for p in PROMPTS]
    finally:
        hf.load_state_dict(original)
    assert [s.token_ids for s in after.samples] != [s.token_ids for s in before.samples]
    assert eng.last_sync.tensors == len(moved)
    with pytest.raises(WeightSyncError, match="model.layers.0.nope.weight"):
        eng.update_weights(iter([("model.layers.0.nope.weight", torch.zeros(2))]))
    with pytest.raises(WeightSyncError, match=r"model.norm.weight has shape \(3,\)"):
        eng.update_weights(iter([("model.norm.weight", torch.zeros(3))]))
    with pytest.raises(WeightSyncError, match="no tensors"):
        eng.update_weights(iter([]))
    eng.sleep()  # CPU: nothing to release, generation still works
    eng.wake()
    assert eng.generate(PROMPTS[:1], params).samples[0].token_ids == after.samples[0].token_ids
    eng.shutdown()


def test_sampler_follows_the_filtered_distribution():
    # 40k rows with their own seeds drawing from one known distribution: frequencies within 4 sigma.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 40_000
    seeds = seed_tensor(range(1000, 1000 + rows), "cpu")
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8)]:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        tokens, lps = sample_next(logits.expand(rows, -1), params, seeds, step=3)
        probs = filtered(logits[None] / temperature, top_k, top_p).softmax(-1)[0]
        freq = torch.bincount(tokens, minlength=6).double() / rows
        sigma = (probs.double() * (1 - probs.double()) / rows).sqrt()
        assert ((freq - probs.double()).abs() <= 4 * sigma + 1e-12).all(), (params, freq, probs)
        assert torch.allclose(lps, probs.log()[tokens], atol=1e-6)
        assert (probs[tokens] > 0).all()
    # Another step gives other draws from the same seeds; the same step repeats them.
    a, _ = sample_next(logits.expand(64, -1), SamplingParams(), seeds[:64], step=0)
    b, _ = sample_next(logits.expand(64, -1), SamplingParams(), seeds[:64], step=1)
    c, _ = sample_next(logits.expand(64, -1), SamplingParams(), seeds[:64], step=0)
    assert torch.equal(a, c) and not torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(n=0), r"\.n"),
        (dict(stop_token_ids=(300,)), "stop_token_ids"),
        (dict(seed=-3), "seed"),
        (dict(prompt_index_offset=-1), "prompt_index_offset"),
    ],
)
def test_bad_sampling_params_are_named(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(PROMPTS, SamplingParams(**kwargs))


def test_bad_prompts_are_named(engine):
    with pytest.raises(ValueError, match="prompt 1: token id 300"):
        engine.generate([[1, 2], [300]], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="prompt 0: empty"):
        engine.generate([[]], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="max_model_len 128"):
        engine.generate([[1] * 100], SamplingParams(max_new_tokens=40))


def test_config_errors_name_the_field(tmp_path):
    for kwargs, field in [
        (dict(engine="sglang"), "rollout.engine"),
        (dict(model_path=""), "rollout.model_path"),
        (dict(bucket_bytes=0), "rollout.bucket_bytes"),
        (dict(mode="remote"), "rollout.mode"),
        (dict(device="tpu"), "rollout.device"),
        (dict(dtype="fp8"), "rollout.dtype"),
        (dict(gpu_memory_utilization=1.5), "rollout.gpu_memory_utilization"),
    ]:
        with pytest.raises(RolloutConfigError, match=field):
            RolloutConfig(**{"model_path": str(tmp_path), **kwargs})
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_engine(RolloutConfig(engine="torch", model_path=str(tmp_path)))
    (tmp_path / "config.json").write_text('{"model_type": "qwen3", ')
    with pytest.raises((ValueError, OSError), match="config.json"):
        build_engine(RolloutConfig(engine="torch", model_path=str(tmp_path)))


def test_missing_weights_say_how_to_start_without_them(tmp_path, model_dir):
    import shutil

    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="dummy"):
        TorchRolloutEngine(RolloutConfig(engine="torch", model_path=str(tmp_path)))
    eng = TorchRolloutEngine(RolloutConfig(engine="torch", model_path=str(tmp_path), load_format="dummy"))
    assert all(math.isfinite(x) for x in eng.generate([[1, 2]], SamplingParams(max_new_tokens=3)).samples[0].logprobs)
    eng.shutdown()
    # A checkpoint that lacks a weight is refused (the model is not randomly initialised before loading).
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightSyncError, match="model.layers.1.mlp.up_proj.weight"):
        TorchRolloutEngine(RolloutConfig(engine="torch", model_path=str(tmp_path)))


def test_compiled_decode_step_gives_the_eager_samples(engine, model_dir, hf):
    # The whole step (forward + sampling) compiles as one graph (fullgraph=True: a graph break fails here);
    # on GPU the same graph is what CUDA graphs replay.
    params = SamplingParams(n=2, temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=9, seed=3)
    compiled = TorchRolloutEngine(
        RolloutConfig(
            engine="torch", model_path=str(model_dir), max_model_len=128, max_batch_size=3, compile_decode=True
        )
    )
    try:
        got, want = compiled.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    finally:
        compiled.shutdown()
    assert [s.token_ids for s in got.samples] == [s.token_ids for s in want.samples]
    for g, w in zip(got.samples, want.samples):
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5)
        ref = hf_logprobs(hf, PROMPTS[g.prompt_index], g.token_ids, params)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-4)


def test_tied_head_follows_the_embedding(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tiny_qwen3(tmp_path / "tied", tie=True, vocab=300, layers=2, hidden=64)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eng = TorchRolloutEngine(RolloutConfig(engine="torch", model_path=str(folder), max_model_len=64))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    assert [s.token_ids for s in eng.generate(PROMPTS, greedy).samples] == [hf_greedy(hf, p, 6) for p in PROMPTS]
    # A tied checkpoint has no lm_head.weight: syncing the embedding alone must move the head too.
    emb = hf.model.embed_tokens.weight
    with torch.no_grad():
        emb.add_(0.3 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(1)))
    eng.update_weights(iter([("model.embed_tokens.weight", emb.detach().clone())]))
    assert [s.token_ids for s in eng.generate(PROMPTS, greedy).samples] == [hf_greedy(hf, p, 6) for p in PROMPTS]
    eng.shutdown()


def test_unsupported_architectures_point_to_vllm(tmp_path):
    from _models import tiny_qwen3_moe

    folder = tiny_qwen3_moe(tmp_path / "moe")
    with pytest.raises(ValueError, match="model_type 'qwen3_moe' is not supported.*rollout.engine: vllm"):
        TorchRolloutEngine(RolloutConfig(engine="torch", model_path=str(folder), load_format="dummy"))
