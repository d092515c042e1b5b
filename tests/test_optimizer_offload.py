"""CPU offload of the optimizer (optim.cpu_offload: Megatron-core's HybridDeviceOptimizer under the distributed
optimizer): the same update as keeping the optimizer on the device, at DP1 and DP2, and checkpoints that resume
exactly, in both directions between offloaded and not. On this CPU-only machine the "device" is the CPU too;
the shim makes the hybrid optimizer treat the model's tensors as device tensors and its copies as host ones,
so its real path runs: host copies, gradient copies, the host optimizer step and the copy back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _models import tiny_qwen3
from _train_step import train_step

from uniapl_megatron.models.arch import ConfigError
from uniapl_megatron.models.qwen3 import ModelConfig
from uniapl_megatron.parallel import ParallelConfig
from uniapl_megatron.trainer.optim import OptimConfig

BF16 = ["--dtype", "bf16"]  # offload needs 16-bit weights (see OptimConfig.validate)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_qwen3(tmp_path_factory.mktemp("hf") / "m", tie=False, vocab=256)


def assert_same_bf16(got: dict, ref: dict, what: str) -> None:
    # Both sides run torch's AdamW on the same fp32 master weights and gradients (the host side with
    # fused=True), then round to bf16. Allowed: one bf16 rounding step (relative 2**-7), for a fused kernel that
    # rounds an fp32 master differently in its last bit, and, where weight and update cancel to near zero, one
    # fp32 rounding at the tensor's own scale (eps times its largest entry; measured: 2.3e-10 on an o_proj entry
    # of 9e-9 in a tensor whose largest is 0.078, bound 9.3e-9; a lost state would show as ~1e-3).
    for k in ref:
        scale = ref[k].float().abs().max().item()
        assert torch.allclose(
            got[k].float(), ref[k].float(), rtol=2**-7, atol=torch.finfo(torch.float32).eps * scale
        ), (what, k)


@pytest.mark.parametrize("world", [1, 2])
def test_offload_gives_the_same_update(model, tmp_path, world):
    ref, ref_m = train_step(model, tmp_path / "device", world, *BF16)
    before = {k: v.to(torch.bfloat16) for k, v in __import__("_models").load_safetensors_folder(model).items()}
    assert max((ref[k].float() - before[k].float()).abs().max().item() for k in ref) > 1e-3, "no update"
    runs = {
        "all": ["--offload", "1.0"],
        "half": ["--offload", "0.5"],
        "all, overlapped": ["--offload", "1.0", "--overlap"],
    }
    for name, args in runs.items():
        got, m = train_step(model, tmp_path / name.replace(", ", "_"), world, *BF16, *args)
        if name == "half":  # part on the host, the rest with a device optimizer
            assert 0 < m["host_numel"] < m["shard_numel"] and m["device_optimizer"], m
        else:
            assert m["host_numel"] == m["shard_numel"] and not m["device_optimizer"], m
        if name == "all, overlapped":  # one host optimizer per parameter shard
            assert m["cpu_optimizers"] > 1, m
        assert abs(m["loss/total"] - ref_m["loss/total"]) <= 1e-6
        assert_same_bf16(got, ref, name)


def test_offload_checkpoint_resumes_exactly(model, tmp_path):
    # Plain Adam: from the second step on its moments shape the update, so a lost state would show.
    adam = [*BF16, "--adam"]
    ck_off, ck_dev = tmp_path / "ck_offload", tmp_path / "ck_device"
    straight, _ = train_step(
        model, tmp_path / "straight", 2, *adam, "--offload", "1.0", "--steps", "2", "--save", str(ck_off)
    )
    one, _ = train_step(model, tmp_path / "one", 2, *adam, "--offload", "1.0")
    assert not all(torch.equal(straight[k], one[k]) for k in one), "the second step changed nothing"
    resumed, _ = train_step(model, tmp_path / "resumed", 2, *adam, "--offload", "1.0", "--resume", str(ck_off))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight), "offload -> offload resume differs"
    # The checkpoint format is the distributed optimizer's either way: offload can be turned on or off.
    resumed, _ = train_step(model, tmp_path / "to_device", 2, *adam, "--resume", str(ck_off))
    assert_same_bf16(resumed, straight, "offloaded checkpoint resumed on the device")
    straight_dev, _ = train_step(model, tmp_path / "straight_dev", 2, *adam, "--steps", "2", "--save", str(ck_dev))
    resumed, _ = train_step(model, tmp_path / "to_host", 2, *adam, "--offload", "1.0", "--resume", str(ck_dev))
    assert_same_bf16(resumed, straight_dev, "device checkpoint resumed offloaded")


@pytest.mark.parametrize(
    "optim,parallel,dtype,match",
    [
        (dict(cpu_offload=True), dict(use_distributed_optimizer=False), "bf16", "parallel.use_distributed_optimizer"),
        (dict(cpu_offload=True), {}, "fp32", "model.dtype"),
        (dict(cpu_offload=True, cpu_offload_fraction=0.0), {}, "bf16", "optim.cpu_offload_fraction"),
        (dict(cpu_offload=True, cpu_offload_fraction=1.5), {}, "bf16", "optim.cpu_offload_fraction"),
        (dict(optimizer="sgd"), {}, "bf16", "optim.optimizer=sgd"),
        (dict(optimizer="lion"), {}, "bf16", "optim.optimizer"),
    ],
)
def test_offload_config_errors_name_the_field(optim, parallel, dtype, match):
    with pytest.raises(ConfigError, match=match):
        OptimConfig(**optim).validate(ParallelConfig(**parallel), ModelConfig(dtype=dtype))
    OptimConfig().validate(ParallelConfig(**parallel), ModelConfig(dtype=dtype))  # the defaults pass
