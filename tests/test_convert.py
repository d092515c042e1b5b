"""tools/convert_hf.py: bit-exact round trips at several layouts, logits vs transformers, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _models import load_safetensors_folder, tiny_qwen3, tiny_qwen3_moe

from uniapl_megatron.launch import run_ranks

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(ROOT / "tools" / "convert_hf.py")]


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"convert_hf.py {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hf")
    return {
        "tied": tiny_qwen3(d / "tied", tie=True),
        "untied": tiny_qwen3(d / "untied", tie=False, seed=1),
        "bf16": tiny_qwen3(d / "bf16", tie=False, dtype="bfloat16", seed=2),
        "moe": tiny_qwen3_moe(d / "moe"),
    }


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_safetensors_folder(a), load_safetensors_folder(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert torch.equal(ta[k], tb[k]), f"{k} differs"


@pytest.fixture(scope="module")
def imported(models, tmp_path_factory):
    """`imported(name, dtype, layout)`: the model's checkpoint written by `convert import` at that layout, made
    once per module (a round trip's import is what the shard and logits tests read too; the checkpoint is
    layout-free)."""
    done: dict[tuple, Path] = {}

    def get(name: str, dtype: str, layout: list[str]) -> Path:
        key = (name, dtype, *layout)
        if key not in done:
            mc = tmp_path_factory.mktemp("mcore") / "_".join(key)
            convert("import", "--hf", str(models[name]), "--out", str(mc), "--dtype", dtype, *layout)
            done[key] = mc
        return done[key]

    return get


# (model, dtype, import layout, export layout): layouts differ on purpose — the checkpoint is layout-free.
# Covered in both directions: tied / untied / bf16 / moe; TP, PP, VPP, EP (2 and 4); TP 4 > KV heads.
ROUND_TRIPS = [
    ("tied", "fp32", ["--tp", "2", "--pp", "2"], []),
    ("tied", "fp32", ["--tp", "4"], ["--tp", "2", "--pp", "2"]),  # TP 4 > 2 KV heads: replicated, then folded
    ("untied", "fp32", ["--pp", "2", "--vpp", "2"], ["--tp", "2"]),  # VPP: 4 chunks of one layer each
    ("bf16", "bf16", [], ["--pp", "2", "--vpp", "2"]),
    ("moe", "fp32", ["--tp", "2", "--ep", "2"], ["--pp", "2", "--ep", "2"]),
    ("moe", "fp32", [], ["--ep", "4"]),
]


@pytest.mark.parametrize("name,dtype,imp,exp", ROUND_TRIPS, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_round_trip_bit_exact(models, imported, tmp_path, name, dtype, imp, exp):
    out = tmp_path / "hf"
    convert("export", "--mcore", str(imported(name, dtype, imp)), "--out", str(out), *exp)
    assert_same_tensors(models[name], out)
    # The exported folder is a working HF model folder.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == json.loads((models[name] / "config.json").read_text())["model_type"]
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert (out / "generation_config.json").is_file()


def test_export_writes_several_shards(models, imported, tmp_path):
    out = tmp_path / "hf"
    mc = imported("untied", "fp32", ["--pp", "2", "--vpp", "2"])
    convert("export", "--mcore", str(mc), "--out", str(out), "--max-shard-size", "100KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    assert_same_tensors(models["untied"], out)


def _hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


# (model, layout the checkpoint was imported at, layout the logits are computed at)
@pytest.mark.parametrize(
    "name,imp,layout",
    [
        ("tied", ["--tp", "2", "--pp", "2"], ["--tp", "2", "--pp", "2", "--sp"]),
        ("moe", [], ["--tp", "2", "--ep", "2", "--sp"]),
    ],
)
def test_logits_match_transformers(models, imported, tmp_path, name, imp, layout):
    mc = imported(name, "fp32", imp)
    torch.manual_seed(0)
    tokens = torch.randint(0, 300, (2, 16))
    torch.save(tokens, tmp_path / "tokens.pt")
    world = 4
    code = run_ranks(
        [
            sys.executable,
            str(ROOT / "tests" / "workers" / "megatron_logits.py"),
            "--mcore",
            str(mc),
            "--tokens",
            str(tmp_path / "tokens.pt"),
            "--out",
            str(tmp_path / "logits.pt"),
            *layout,
        ],
        world,
        timeout=600,
    )
    assert code == 0
    ours = torch.load(tmp_path / "logits.pt", weights_only=True)
    ref = _hf_logits(models[name], tokens)
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff}"


# ---- bad input: each gets its own message, and nothing half-written -----------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_config_that_does_not_match_the_weights(models, tmp_path):
    bad = _copy(models["untied"], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    p = convert("import", "--hf", str(bad), "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2
    # The first disagreeing tensor is named with both shapes (tensors are checked in sorted order).
    assert "'model.layers.0.mlp.down_proj.weight' has shape (64, 128) but config.json implies (64, 96)" in p.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_missing_and_unexpected_tensors(models, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(models["untied"] / "config.json", bad / "config.json")
    tensors = load_safetensors_folder(models["untied"])
    tensors.pop("model.layers.1.self_attn.k_proj.weight")
    tensors["model.layers.0.self_attn.rotary.inv_freq"] = torch.ones(4)
    save_file(tensors, bad / "model.safetensors")
    p = convert("import", "--hf", str(bad), "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2
    assert "missing (1): model.layers.1.self_attn.k_proj.weight" in p.stderr
    assert "unexpected (1): model.layers.0.self_attn.rotary.inv_freq" in p.stderr


def test_output_exists_needs_force(models, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    p = convert("import", "--hf", str(models["tied"]), "--out", str(out), check=False)
    assert p.returncode == 2 and "--force" in p.stderr
    assert (out / "keep.txt").read_text() == "user data"
    convert("import", "--hf", str(models["tied"]), "--out", str(out), "--force", "--dtype", "fp32")
    assert (out / "uniapl_checkpoint.json").is_file() and not (out / "keep.txt").exists()


def test_pickle_only_folder_is_refused(models, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(models["tied"] / "config.json", bad / "config.json")
    torch.save({"x": torch.ones(1)}, bad / "pytorch_model.bin")
    p = convert("import", "--hf", str(bad), "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2 and "pytorch_model.bin" in p.stderr and "pickle" in p.stderr


def test_not_a_checkpoint_and_bad_layout(models, tmp_path):
    p = convert("export", "--mcore", str(models["tied"]), "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2 and "uniapl_checkpoint.json" in p.stderr
    p = convert("import", "--hf", str(models["tied"]), "--out", str(tmp_path / "o"), "--tp", "3", check=False)
    assert p.returncode == 2 and "num_attention_heads=4 is not divisible by TP=3" in p.stderr
    p = convert("import", "--hf", str(models["tied"]), "--out", str(tmp_path / "o"), "--pp", "3", check=False)
    assert p.returncode == 2 and "num_hidden_layers=4 is not divisible by PP*VPP" in p.stderr
    p = convert("import", "--hf", str(models["tied"]), "--out", str(tmp_path / "o"), "--ep", "2", check=False)
    assert p.returncode == 2 and "has no experts" in p.stderr


def test_interrupted_import_leaves_no_output(models, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [*CLI, "import", "--hf", str(models["tied"]), "--out", str(out), "--tp", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    partial = tmp_path / ".o.partial"
    deadline = time.monotonic() + 120
    while not partial.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its ranks, mid-conversion
    proc.wait()
    assert not out.exists()
    # A later run cleans the leftover and succeeds.
    convert("import", "--hf", str(models["tied"]), "--out", str(out), "--dtype", "fp32")
    assert (out / "uniapl_checkpoint.json").is_file() and not partial.exists()
