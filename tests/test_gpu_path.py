"""The GPU path, checked where it can run without a GPU or Transformer Engine: FP8 padding per recipe and
layout, the start-up refusals (TE missing or broken, FP8 on too old a GPU), the fused-kernel and overlap
decisions, FP8 weights dequantised on export, data-parallel overlap kept correct, and CUDA settings kept
out of vLLM's processes.

Stand-ins, each named where it is used, only for what cannot run here: TE's FP8 weight class, a broken TE
install, and the GPU's compute-capability query.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from _models import load_safetensors_folder, tiny_qwen3
from _train_step import max_diff, train_step

from uniapl_megatron.data.packing import aligned_length, pack_sequences, required_pad_multiple, row_pad_multiple
from uniapl_megatron.models import specs
from uniapl_megatron.models.arch import ConfigError
from uniapl_megatron.models.qwen3 import ModelConfig, check_fp8_training
from uniapl_megatron.parallel import ParallelConfig
from uniapl_megatron.trainer.overlap import decide_overlap

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"delayed": 16, "tensorwise": 16, "blockwise": 128, "mxfp8": 32}
TE_MISSING = "No module named 'transformer_engine'"


# ---- FP8 padding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["none", *RECIPES])
@pytest.mark.parametrize("tp,cp,sp", [(1, 1, False), (4, 1, False), (4, 1, True), (2, 2, True), (1, 4, False)])
def test_fp8_padding_per_recipe_and_layout(recipe, tp, cp, sp):
    seq_m, row_m = required_pad_multiple(tp, cp, sp), row_pad_multiple(tp, cp, sp, fp8_recipe=recipe)
    split = (tp if sp else 1) * cp  # how many ranks share one sequence's tokens
    align = RECIPES.get(recipe, 1)
    lens = [1, 7, 31, 129, 300]
    row = pack_sequences([list(range(n)) for n in lens], [1] * len(lens), pad_multiple=seq_m, row_multiple=row_m)
    padded = row.cu_seqlens_padded.diff().tolist()
    # Every sequence splits evenly over CP (2*cp chunks) and SP (TP ranks); only the last one takes more than
    # that, so that each rank's share of the row is a multiple of the recipe's GEMM multiple.
    assert all(p % seq_m == 0 for p in padded)
    assert padded[:-1] == [aligned_length(n, seq_m) for n in lens[:-1]]
    assert row.num_tokens % split == 0 and row.num_tokens // split % align == 0, (recipe, tp, cp, sp, padded)
    assert row.num_tokens - sum(aligned_length(n, seq_m) for n in lens) < row_m  # no more than the row lacks
    # NeMo-RL's rule: sequences x (TP under SP) x (2*CP); the row x the recipe multiple on top.
    assert seq_m == (tp if sp else 1) * (2 * cp if cp > 1 else 1) and row_m == seq_m * align


def test_fp8_padding_refuses_an_unknown_recipe():
    with pytest.raises(ValueError, match="unknown FP8 recipe 'fp4'"):
        row_pad_multiple(2, 1, True, fp8_recipe="fp4")


def test_run_config_pads_for_the_recipe(tmp_path):
    from uniapl_megatron.trainer.batch import Seq, pack_for_rank
    from uniapl_megatron.trainer.config import load_config

    recipe = ROOT / "examples" / "qwen3_8b_32x8.yaml"  # TP 4 with sequence parallelism
    assert load_config(recipe).data.pad_multiple == 4
    # FP8 pads the packed row, not each sequence.
    assert load_config(recipe, ["model.fp8=blockwise"]).data.pad_multiple == 4
    # A user multiple is kept, raised to a multiple of the layout's.
    assert load_config(recipe, ["model.fp8=mxfp8", "data.pad_multiple=6"]).data.pad_multiple == 12
    cfg = load_config(recipe, ["model.fp8=blockwise"])
    seqs = [Seq(list(range(n)), 1, True) for n in (5, 130, 9, 77)]
    mbs = pack_for_rank(
        seqs,
        cfg.data.max_tokens_per_micro_batch,
        cfg.parallel,
        cfg.data.pad_multiple,
        0,
        1,
        0,
        fp8_recipe=cfg.model.fp8,
    )
    for mb in mbs:  # each TP rank's share of the row: a multiple of 128 (blockwise) by padding the row to 512
        padded, lens = mb.packed.cu_seqlens_padded.diff().tolist(), mb.packed.seq_lens
        assert mb.packed.num_tokens % 512 == 0 and padded[:-1] == [aligned_length(n, 4) for n in lens[:-1]]
    assert sum(mb.packed.num_tokens for mb in mbs) == 512  # per-sequence FP8 padding took 4 x 512


# ---- refusals: Transformer Engine missing or broken ---------------------------------------------------------


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fp8_recipe_fails_loudly_without_transformer_engine(recipe):
    # Real: TE is not installed here, so its import really fails; the refusal names that error.
    with pytest.raises(ConfigError) as e:
        ModelConfig(fp8=recipe).use_te()
    assert f"model.fp8={recipe}" in str(e.value) and TE_MISSING in str(e.value)


def test_spec_te_fails_loudly_and_spec_torch_refuses_fp8():
    with pytest.raises(ConfigError, match=f"model.spec=te: Transformer Engine does not import: .*{TE_MISSING}"):
        ModelConfig(spec="te").use_te()
    with pytest.raises(ConfigError, match="model.spec=torch has no FP8"):
        ModelConfig(spec="torch", fp8="tensorwise").use_te()


@pytest.fixture
def broken_te(tmp_path, monkeypatch):
    """Stand-in for a broken Transformer Engine install: a `transformer_engine` package whose torch part fails
    to load its CUDA library, as a TE built for another CUDA does."""
    pkg = tmp_path / "transformer_engine"
    (pkg / "pytorch").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '2.10.0'\n")
    (pkg / "pytorch" / "__init__.py").write_text(
        "raise OSError('libcudnn_graph.so.9: cannot open shared object file: No such file or directory')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [n for n in sys.modules if n.startswith("transformer_engine")]:
        del sys.modules[name]


def test_broken_transformer_engine_is_named_not_swallowed(broken_te, caplog, monkeypatch):
    with pytest.raises(ConfigError, match="OSError: libcudnn_graph.so.9: cannot open shared object file"):
        ModelConfig(fp8="blockwise").use_te()
    with pytest.raises(ConfigError, match="model.spec=te: Transformer Engine does not import: OSError: libcudnn"):
        ModelConfig(spec="te").use_te()
    # spec auto on a GPU machine falls back, and says why, as a warning (the GPU is a stand-in: is_available).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    specs._logged.clear()
    with caplog.at_level(logging.INFO, logger="uniapl_megatron.models.specs"):
        assert ModelConfig(spec="auto").use_te() is False
    rec = [r for r in caplog.records if "model.spec=auto" in r.getMessage()]
    assert rec and rec[0].levelno == logging.WARNING
    assert (
        "torch-native layer spec, because Transformer Engine does not import (OSError: libcudnn" in rec[0].getMessage()
    )


def test_spec_auto_logs_its_choice_on_cpu(caplog):
    specs._logged.clear()
    with caplog.at_level(logging.INFO, logger="uniapl_megatron.models.specs"):
        assert ModelConfig(spec="auto").use_te() is False
    assert "model.spec=auto: torch-native layer spec (no CUDA device)" in caplog.text


# ---- refusals: the GPU generation ---------------------------------------------------------------------------


def _capability(monkeypatch, cap):
    # Stand-in for the one GPU query these checks make (there is no GPU here).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)


def test_mxfp8_is_refused_on_hopper_at_start_up(monkeypatch):
    _capability(monkeypatch, (9, 0))
    with pytest.raises(ConfigError) as e:
        ModelConfig(fp8="mxfp8").use_te()
    msg = str(e.value)
    assert "model.fp8=mxfp8 needs a Blackwell GPU (compute capability 10.0 or newer); this GPU is 9.0 (Hopper)" in msg
    assert "use model.fp8=blockwise or tensorwise there" in msg
    # On Blackwell the GPU is fine; only the missing TE is left to refuse.
    _capability(monkeypatch, (10, 0))
    with pytest.raises(ConfigError) as e:
        ModelConfig(fp8="mxfp8").use_te()
    assert "Blackwell" not in str(e.value) and TE_MISSING in str(e.value)


@pytest.mark.parametrize(
    "recipe,cap,ok",
    [
        ("tensorwise", (8, 0), False),
        ("delayed", (8, 9), True),
        ("blockwise", (8, 9), False),
        ("blockwise", (9, 0), True),
        ("mxfp8", (9, 0), False),
        ("mxfp8", (10, 0), True),
        ("mxfp8", (12, 0), True),
    ],
)
def test_fp8_generation_table(recipe, cap, ok):
    problem = specs.fp8_hardware_problem(recipe, cap)
    assert (problem is None) == ok, problem


def test_fp8_option_combinations():
    with pytest.raises(ConfigError, match="model.fp8_param=true needs an FP8 recipe"):
        ModelConfig(fp8_param=True).use_te()
    with pytest.raises(ConfigError, match="model.fp8_bf16_first_last_layers=true needs an FP8 recipe"):
        ModelConfig(fp8_bf16_first_last_layers=True).use_te()
    with pytest.raises(ConfigError, match="does not work with model.fp8=delayed"):
        ModelConfig(fp8="delayed", fp8_bf16_first_last_layers=True).use_te()
    with pytest.raises(ConfigError, match="needs parallel.use_distributed_optimizer=true"):
        check_fp8_training(
            ModelConfig(fp8="tensorwise", fp8_param=True), ParallelConfig(use_distributed_optimizer=False)
        )
    check_fp8_training(ModelConfig(fp8="tensorwise", fp8_param=True), ParallelConfig())


# ---- fused kernels and overlap: where each applies ----------------------------------------------------------


def test_fused_kernels_only_where_they_exist(monkeypatch):
    assert not any(specs.fused_kernels(use_te=False).values())  # CPU / torch-native spec: none
    on = specs.fused_kernels(use_te=True)
    assert on["apply_rope_fusion"] and on["bias_activation_fusion"] and on["bias_dropout_fusion"]
    assert not on["gradient_accumulation_fusion"]  # no CUDA, no apex here
    # With CUDA and apex's wgrad extension (both stand-ins: a GPU query and an empty module) it turns on.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", type(sys)("fused_weight_gradient_mlp_cuda"))
    assert specs.fused_kernels(use_te=False)["gradient_accumulation_fusion"]


@pytest.mark.parametrize(
    "mode,dp,cuda,dist_opt,rep_kv,want",
    [
        ("auto", 8, True, True, False, (True, True)),
        ("auto", 8, True, False, False, (True, False)),  # weight gather overlap is the distributed optimizer's
        ("auto", 1, True, True, False, (False, False)),
        ("auto", 8, False, True, False, (False, False)),  # gloo: nothing to overlap
        ("on", 2, False, True, False, (True, True)),
        ("off", 8, True, True, False, (False, False)),
        ("auto", 8, True, True, True, (False, True)),  # replicated KV heads: their grads are summed after backward
    ],
)
def test_overlap_decision(mode, dp, cuda, dist_opt, rep_kv, want):
    o = decide_overlap(mode, dp, cuda, dist_opt, rep_kv)
    assert (o.grad_reduce, o.param_gather) == want, o.reason


def test_overlap_mode_is_checked():
    with pytest.raises(ConfigError, match="optim.overlap_comm='yes'"):
        decide_overlap("yes", 2, True, True, False)


# ---- runs on gloo ranks -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_qwen3(tmp_path_factory.mktemp("gpu_path") / "m", tie=False)


def test_fp8_weights_are_dequantised_on_export(model, tmp_path):
    """TP 2, linear weights in FP8 with each rank's own scale (the stand-in for TE's class, see the worker): the
    export equals the one from plain dequantised shards, not the FP8 bytes and not the unquantised weights."""
    from safetensors.torch import load_file

    from uniapl_megatron.launch import run_ranks

    out = tmp_path / "export"
    code = run_ranks(
        [sys.executable, str(ROOT / "tests" / "workers" / "fp8_export.py"), "--hf", str(model), "--out", str(out)],
        2,
        timeout=600,
    )
    assert code == 0
    fp8, ref = load_file(f"{out}.fp8.safetensors"), load_file(f"{out}.ref.safetensors")
    original = {k: v.to(torch.bfloat16) for k, v in load_safetensors_folder(model).items()}
    assert fp8.keys() == ref.keys() == original.keys()
    quantised = [k for k in ref if k.startswith("model.layers.") and k.endswith("_proj.weight")]
    assert len(quantised) == 4 * 7  # 4 layers x q, k, v, o, gate, up, down
    for k in ref:
        assert fp8[k].dtype == torch.bfloat16 and torch.equal(fp8[k], ref[k]), k
    # The round trip really changed the linear weights (so the comparison above means something) and nothing else.
    assert all(not torch.equal(ref[k], original[k]) for k in quantised)
    assert all(torch.equal(ref[k], original[k]) for k in ref if k not in quantised)
    worst = max(
        ((ref[k].float() - original[k].float()).abs().max() / original[k].float().abs().max()).item() for k in quantised
    )
    assert worst < 0.07  # e4m3 keeps 3 mantissa bits: within 1/16 of the shard's largest value


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--tp", "1", "--pp", "2", "--vpp", "2"]], ids=["tp2", "pp2-vpp2"])
def test_fp32_masters_start_from_the_loaded_values_not_the_fp8_copies(model, tmp_path, layout):
    """model.fp8_param: Student.load_hf keeps the file's shards and sets the optimizer's fp32 master weights
    from them (Megatron's reload_model_params(state_dict)). Checked where it can run: bf16 weights zeroed after
    loading, so only the kept shards can bring the file's values back through an optimizer step at lr 0."""
    from safetensors.torch import load_file

    from uniapl_megatron.launch import run_ranks

    out = tmp_path / "masters"
    code = run_ranks(
        [
            sys.executable,
            str(ROOT / "tests" / "workers" / "fp8_export.py"),
            "--hf",
            str(model),
            "--out",
            str(out),
            "--masters",
            *layout,
        ],
        2,
        timeout=600,
    )
    assert code == 0
    got = load_file(f"{out}.masters.safetensors")
    want = {k: v.to(torch.bfloat16) for k, v in load_safetensors_folder(model).items()}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_data_parallel_overlap_matches_and_checkpoints_the_gathered_weights(model, tmp_path):
    """DP 2, overlap forced on without a GPU (optim.overlap_comm=on): two Adam steps whose micro-batch counts
    differ (2 then 3 per rank: Megatron must hold each bucket's reduce back until the last one), the first step's
    checkpoint taken while the weight gather is still owed. Same
    weights as without overlap; resuming the checkpoint gives the same second step."""
    args = ("--steps", "2", "--mb-tokens", "128", "--mb-tokens-later", "48", "--adam", "--dtype", "bf16")
    off, m_off = train_step(model, tmp_path / "off", 2, *args)
    on, m_on = train_step(model, tmp_path / "on", 2, *args, "--ddp-overlap", "--save", str(tmp_path / "ck"))
    assert (m_off["overlap_grad_reduce"], m_off["overlap_param_gather"]) == (False, False)
    assert (m_on["overlap_grad_reduce"], m_on["overlap_param_gather"]) == (True, True)
    assert m_on["micro_batches"] == 3  # per rank in the second step; the first had 2
    assert max_diff(on, off) == 0.0
    resumed, _ = train_step(
        model,
        tmp_path / "resumed",
        2,
        "--mb-tokens",
        "48",
        "--adam",
        "--dtype",
        "bf16",
        "--ddp-overlap",
        "--resume",
        str(tmp_path / "ck"),
    )
    assert all(torch.equal(resumed[k], on[k]) for k in on)
    shutil.rmtree(tmp_path / "ck", ignore_errors=True)


# ---- CUDA_DEVICE_MAX_CONNECTIONS stays the trainer's ---------------------------------------------------------


def _child_env(q) -> None:
    q.put(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))


def test_vllm_start_hides_the_trainers_cuda_setting_from_its_processes(monkeypatch):
    from uniapl_megatron.rollout.vllm_host import keep_process_state

    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    ctx = mp.get_context("spawn")  # how vLLM starts its engine core and workers
    q = ctx.Queue()
    with keep_process_state():  # what VLLMRolloutEngine wraps around LLM(...)
        p = ctx.Process(target=_child_env, args=(q,))
        p.start()
        seen = q.get(timeout=120)
        p.join(timeout=60)
    assert seen is None
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # the trainer keeps it
