"""The trainer's Megatron step: every layout and micro-batching give the same update, loss and grad norm;
config errors are clear."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from _models import tiny_qwen3, tiny_qwen3_moe
from _train_step import max_diff
from _train_step import train_step as _step
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_qwen3(tmp_path_factory.mktemp("hf") / "m", tie=False, vocab=256)


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> Path:
    return tiny_qwen3_moe(tmp_path_factory.mktemp("hf") / "moe", vocab=256)


# Three steps of the uniapl preset (demos + rollouts: SFT, policy-gradient and adversarial terms) with real Adam
# and a clip that binds (the grad norm is ~3-4). lr 1e-4: plain Adam's first steps are ~lr*sign(g), so a
# gradient within rounding of 0 can flip an update; at 1e-4 that stays well inside the 1e-5 bar.
ADAM_CLIPPED = ("--steps", "3", "--adam", "--lr", "1e-4", "--clip", "1.0")
# id: (model, ranks, layout arguments); each must match its model's single-rank run.
LAYOUTS = {
    "tp2-sp": ("dense", 2, ["--tp", "2", "--sp"]),
    "pp2-4mb": ("dense", 2, ["--pp", "2", "--mb-tokens", "80"]),
    # 3 micro-batches by budget, rounded up to 4 (a multiple of PP) for the interleaved schedule
    "pp2-vpp2": ("dense", 2, ["--pp", "2", "--vpp", "2", "--mb-tokens", "100"]),
    "dp2": ("dense", 2, []),
    "dp2-no-dist-opt-4mb": ("dense", 2, ["--no-dist-opt", "--mb-tokens", "40"]),  # 4 per rank
    "tp4-kv-replicated": ("dense", 4, ["--tp", "4"]),  # 2 KV heads: each TP rank holds a copy of one
    "ep2-moe": ("moe", 2, ["--ep", "2"]),
    # each packed row padded for blockwise FP8's 128-token GEMM tiles (the padding only; no FP8 on CPU)
    "fp8-row-padding": ("dense", 1, ["--row-pad", "blockwise"]),
}


@pytest.fixture(scope="module")
def single_rank(model, moe_model, tmp_path_factory) -> Callable[[str], tuple[dict, dict]]:
    """The 1-rank run of each model (TP1, PP1, DP1, EP1), run once and shared by the layouts."""
    runs: dict[str, tuple[dict, dict]] = {}

    def get(name: str) -> tuple[dict, dict]:
        if name not in runs:
            hf = model if name == "dense" else moe_model
            weights, m = _step(hf, tmp_path_factory.mktemp("ref") / name, 1, *ADAM_CLIPPED)
            assert all(s["grad_norm"] > 1.5 for s in m["steps"]), f"the clip at 1.0 does not bind: {m['steps']}"
            before = load_file(str(hf / "model.safetensors"))
            assert max_diff(weights, before) > 1e-4, "the steps did not change the weights"
            runs[name] = weights, m
        return runs[name]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_rank(single_rank, model, moe_model, tmp_path, layout):
    """Weights after 3 steps, and every step's loss and grad norm (what clipping scales by), equal 1 rank's."""
    name, world, args = LAYOUTS[layout]
    ref, ref_m = single_rank(name)
    got, m = _step(model if name == "dense" else moe_model, tmp_path / "run", world, *ADAM_CLIPPED, *args)
    if "4mb" in layout or "vpp" in layout:
        assert m["micro_batches"] >= 4, m
    if layout == "fp8-row-padding":  # the row takes the padding, in its last sequence; the others keep their length
        assert all(
            sum(r["padded"]) % 128 == 0
            and r["padded"][:-1] == r["seq_lens"][:-1]
            and r["padded"][-1] > r["seq_lens"][-1]
            for r in m["rows"]
        ), m["rows"]
    steps = [
        (s["grad_norm"], r["grad_norm"], s["loss/total"], r["loss/total"])
        for s, r in zip(m["steps"], ref_m["steps"], strict=True)
    ]
    for i, (norm, ref_norm, loss, ref_loss) in enumerate(steps, 1):
        assert abs(norm - ref_norm) <= 1e-5, f"{layout} step {i}: grad_norm {norm} vs {ref_norm} at one rank"
        assert abs(loss - ref_loss) <= 1e-5, f"{layout} step {i}: loss {loss} vs {ref_loss} at one rank"
    diff = max_diff(got, ref)
    assert diff <= 1e-5, f"{layout}: weights differ from one rank's by {diff}"


def test_moe_student_trains_end_to_end_at_ep2_like_ep1(tmp_path):
    """`uniapl train` (sft preset, real Adam, binding clip) on a Qwen3-MoE student: EP2 (its 2 ranks are data
    parallel, experts split over them) logs the same losses and grad norms as EP1, step by step."""
    import json
    import subprocess
    import sys

    from uniapl_megatron.demo import prepare
    from uniapl_megatron.launch import run_ranks

    moe = tiny_qwen3_moe(tmp_path / "moe", tokenizer=True)
    data = prepare(tmp_path / "assets", train_rows=20)["data"]
    cfg = tmp_path / "moe.yaml"
    cfg.write_text(
        f"model: {{hf_path: {moe}, dtype: fp32, spec: torch}}\n"
        f"data: {{demo_paths: [{data}], demos_per_step: 4, prompts_per_step: 0}}\n"
        "objective: {algorithm: sft}\noptim: {lr: 1.0e-3, clip_grad: 1.0}\n"
        "train: {steps: 3, save_every: 3, tensorboard: false, plot: false}\n"
    )
    cmd = [sys.executable, "-m", "uniapl_megatron.cli", "train", str(cfg)]
    # EP1 runs beside EP2 (own output folders; on a 2-core machine their single-threaded start-ups overlap).
    with open(tmp_path / "ep1.log", "wb") as log:
        ep1_proc = subprocess.Popen(
            [*cmd, f"train.output_dir={tmp_path / 'ep1'}"], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            code = run_ranks(
                [*cmd, f"train.output_dir={tmp_path / 'ep2'}", "parallel.expert_model_parallel_size=2"], 2, timeout=900
            )
            assert code == 0
            assert ep1_proc.wait(timeout=900) == 0, (tmp_path / "ep1.log").read_text()[-3000:]
        finally:
            if ep1_proc.poll() is None:
                ep1_proc.kill()
                ep1_proc.wait()
    ep1, ep2 = (
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("ep1", "ep2")
    )
    assert [m["step"] for m in ep2] == [1, 2, 3] and all(m["grad_norm"] > 1.0 for m in ep1)
    for a, b in zip(ep1, ep2, strict=True):
        for key in ("loss/total", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])


def test_fewer_demos_than_dp_ranks(model, tmp_path):
    """sft with one demonstration at DP2 x PP2: the second DP replica runs a filler micro-batch (no sequence)
    through both pipeline stages, and the step equals one rank's."""
    one_demo = ("--preset", "sft", "--seqs", "1", "--demos", "1")
    ref, ref_m = _step(model, tmp_path / "dp1", 1, *one_demo)
    got, m = _step(model, tmp_path / "dp2", 4, "--pp", "2", *one_demo)
    assert max_diff(got, ref) <= 1e-5
    assert abs(m["loss/total"] - ref_m["loss/total"]) <= 1e-6 and ref_m["loss/total"] > 0, (m, ref_m)


# id: (ranks, worker arguments); each poisons its one step, which every rank must skip. The optimizer forms:
# DistributedOptimizer (the NaN reaches one DP rank's shard), Float16OptimizerWithFloat16Params (bf16; the NaN
# sits on one TP rank's half); FP32Optimizer is test_step_after_a_nan_gradient_is_a_first_step's.
NONFINITE = {
    "loss-dp2": (2, ["--nan", "loss"]),
    "grad-bf16-dp2-dist-opt": (2, ["--nan", "grad", "--dtype", "bf16"]),
    "grad-bf16-tp2": (2, ["--nan", "grad", "--dtype", "bf16", "--tp", "2", "--sp", "--no-dist-opt"]),
}


@pytest.mark.parametrize("case", list(NONFINITE))
def test_nonfinite_step_is_skipped(model, tmp_path, case):
    """A NaN loss, or a NaN gradient under a finite loss, skips the update on every rank: the weights stay."""
    world, args = NONFINITE[case]
    got, m = _step(model, tmp_path / "nan", world, *args, "--clip", "1.0")
    assert m["skipped"] == 1.0, m
    if "grad" in case:  # the loss was fine; the gradient norm was not
        assert math.isfinite(m["loss/total"]) and math.isnan(m["grad_norm"]), m
    before = load_file(str(model / "model.safetensors"))
    changed = [k for k in before if not torch.equal(got[k], before[k].to(got[k].dtype))]
    assert not changed, f"{case}: the skipped step changed {changed}"


def test_step_after_a_nan_gradient_is_a_first_step(model, tmp_path):
    """After a skipped NaN-gradient step, the next step equals a clean run's first one: the gradients were
    dropped and neither Adam's moments and step count nor the LR schedule moved."""
    adam = ("--adam", "--lr", "1e-3", "--no-dist-opt")
    clean, _ = _step(model, tmp_path / "clean", 1, *adam)
    assert max_diff(clean, load_file(str(model / "model.safetensors"))) > 1e-4, "a clean step did not train"
    got, m = _step(model, tmp_path / "nan", 1, *adam, "--nan", "grad", "--steps", "2")
    assert [s["skipped"] for s in m["steps"]] == [1.0, 0.0] and math.isfinite(m["steps"][1]["grad_norm"]), m
    assert max_diff(got, clean) == 0.0


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
    with pytest.raises(ConfigError, match="train.steps: expected an integer, got .abc."):
        load_config(cfg, ["train.steps=abc"])
    c = load_config(cfg, ["train.steps=7", "optim.lr=1e-4"])
    assert c.train.steps == 7 and c.optim.lr == 1e-4


def test_layouts_that_cannot_train_correctly_are_refused(tmp_path):
    from uniapl_megatron.models.arch import ConfigError, Qwen3Arch
    from uniapl_megatron.parallel import ParallelConfig

    arch = Qwen3Arch.from_pretrained(tiny_qwen3(tmp_path / "m", vocab=256))
    with pytest.raises(ConfigError, match="context_parallel_size=2 is refused: the trainer does not yet give each CP"):
        ParallelConfig(context_parallel_size=2).validate(arch, 2, has_cuda=True)
    with pytest.raises(ConfigError, match="virtual_pipeline_model_parallel_size=1: .* integer >= 2"):
        ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=1).validate(arch, 2)
    interleaved = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    assert interleaved.micro_batch_multiple == 2
