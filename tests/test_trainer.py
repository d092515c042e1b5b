"""The trainer's Megatron step: layouts and micro-batching give the same update; config errors are clear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _models import tiny_qwen3
from _train_step import train_step as _step


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_qwen3(tmp_path_factory.mktemp("hf") / "m", tie=False, vocab=256)


def test_layouts_and_micro_batches_give_the_same_update(model, tmp_path):
    ref, ref_m = _step(model, tmp_path / "tp1", 1)
    before = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(model / "model.safetensors")).items()}
    moved = max((ref[k] - before[k]).abs().max().item() for k in ref)
    assert moved > 1e-3, "the step did not change the weights"
    runs = {
        "tp2 pp2 sp": (4, ["--tp", "2", "--pp", "2", "--sp"]),
        "dp2": (2, []),
        "4 micro-batches": (1, ["--mb-tokens", "48"]),
        "dp2 no distributed optimizer": (2, ["--no-dist-opt"]),
    }
    for name, (world, args) in runs.items():
        got, m = _step(model, tmp_path / name.replace(" ", "_"), world, *args)
        if name == "4 micro-batches":
            assert m["micro_batches"] >= 4
        diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
        assert diff <= 1e-5, f"{name}: weights differ from TP=1 by {diff}"
        assert abs(m["loss/total"] - ref_m["loss/total"]) <= 1e-5, (name, m, ref_m)


def test_tp_above_the_kv_heads_keeps_the_kv_copies_equal(tmp_path):
    """1 KV head at TP2: each rank holds a copy of it. Two steps must match TP1's (the copies' gradients are
    summed, so they stay one head; the second step's forward uses both copies)."""
    one_kv = tiny_qwen3(tmp_path / "m", tie=False, vocab=256, kv_heads=1)
    ref, ref_m = _step(one_kv, tmp_path / "tp1", 1, "--steps", "2")
    got, m = _step(one_kv, tmp_path / "tp2", 2, "--tp", "2", "--sp", "--steps", "2")
    diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert diff <= 1e-5, f"TP2 with a replicated KV head differs from TP1 by {diff}"
    assert abs(m["loss/total"] - ref_m["loss/total"]) <= 1e-5, (m, ref_m)


def test_nan_loss_skips_the_step(model, tmp_path):
    from safetensors.torch import load_file

    got, m = _step(model, tmp_path / "nan", 2, "--nan")
    assert m["skipped"] == 1.0
    before = load_file(str(model / "model.safetensors"))
    assert all(torch.equal(got[k], before[k]) for k in before), "a NaN step changed the weights"


def test_config_errors_name_the_key(tmp_path):
    from uniapl_megatron.models.arch import ConfigError
    from uniapl_megatron.trainer.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {hf_path: x}\ntrain: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train.stepz"):
        load_config(cfg)
    cfg.write_text("model: {hf_path: x}\ntrian: {}\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(cfg)
    cfg.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: not valid YAML"):
        load_config(cfg)
    cfg.write_text("model: {hf_path: x}\nobjective: {algorithm: sft}\ndata: {demo_paths: [d.jsonl]}\n")
    with pytest.raises(ConfigError, match="train.steps should be int"):
        load_config(cfg, ["train.steps=abc"])
    c = load_config(cfg, ["train.steps=7", "optim.lr=1e-4"])
    assert c.train.steps == 7 and c.optim.lr == 1e-4
