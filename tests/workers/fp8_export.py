"""Worker (one per rank): the weight export that rollout sync and checkpoint export share, with the linear
weights held in FP8 the way Transformer Engine holds them under model.fp8_param. Used by tests/test_gpu_path.py.

Transformer Engine cannot be installed here, so its FP8 weight class is the one stand-in: `StandInFloat8Param`
holds a real torch.float8_e4m3fn tensor and a per-tensor scale computed from this rank's own shard (TE's current
scaling), and its visible values are the raw FP8 bytes, as TE's parameter storage is. Megatron's own
`is_float8tensor` is pointed at it (it checks TE's class, which is missing here). Rank 0 writes two exports:
`fp8`: the model with stand-in weights; `ref`: the same model with each shard replaced by plain numbers, its own
FP8 round trip computed here with torch's float8 cast.
"""

import argparse
from typing import Self

import torch
import torch.distributed as dist

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_round_trip(shard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 data, 1/scale) of a shard quantised with its own amax, as TE's current scaling does."""
    scale = FP8_MAX / shard.abs().max().float().clamp(min=1e-12)
    return (shard.float() * scale).to(torch.float8_e4m3fn), 1.0 / scale


class StandInFloat8Param(torch.nn.Parameter):
    """Stand-in for Transformer Engine's Float8Tensor parameter (TE is the piece missing here)."""

    def __new__(cls, shard: torch.Tensor) -> Self:
        data, scale_inv = fp8_round_trip(shard)
        raw = data.view(torch.uint8).to(shard.dtype)  # what reading the storage without dequantising gives
        self = super().__new__(cls, raw, requires_grad=False)
        self.fp8_data, self.scale_inv = data, scale_inv
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.fp8_data.float() * self.scale_inv).to(dtype or self.dtype)


def linear_weights(chunks):
    """(module, name) of the GEMM weights TE would keep in FP8 (norms and embeddings stay high precision)."""
    for c in chunks:
        for mod_name, mod in c.named_modules():
            if mod_name.startswith("decoder.layers.") and mod_name.endswith(
                ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
            ):
                yield mod, "weight"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument(
        "--masters",
        action="store_true",
        help="instead: check that the fp32 master weights can start from the shards load_from_hf kept",
    )
    a = ap.parse_args()
    if a.masters:
        return masters(a)

    from megatron.core import fp8_utils
    from safetensors.torch import save_file

    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.models.arch import Qwen3Arch
    from uniapl_megatron.models.qwen3 import ModelConfig
    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.trainer.student import Student

    fp8_utils.HAVE_TE_FP8_TENSOR_CLASS, fp8_utils.FP8_TENSOR_CLASS = True, StandInFloat8Param
    par = ParallelConfig(tensor_model_parallel_size=a.tp)
    init_distributed(par, seed=3)
    arch = Qwen3Arch.from_pretrained(a.hf)
    student = Student(arch, par, ModelConfig(dtype="bf16", spec="torch"), None)  # frozen, as a reference
    student.load_hf(a.hf)
    exports = {}
    for kind in ("ref", "fp8"):
        with torch.no_grad():
            for mod, name in linear_weights(student.chunks):
                shard = getattr(mod, name).detach().clone()
                if kind == "fp8":
                    setattr(mod, name, StandInFloat8Param(shard))
                else:
                    data, scale_inv = fp8_round_trip(shard)
                    getattr(mod, name).copy_((data.float() * scale_inv).to(shard.dtype))
        exports[kind] = {n: t.clone() for n, t in student.hf_tensors()}
        if kind == "ref":
            student.load_hf(a.hf)  # back to the original weights before quantising them the other way
    if dist.get_rank() == 0:
        for kind, tensors in exports.items():
            save_file(tensors, f"{a.out}.{kind}.safetensors")
    dist.barrier()


def masters(a) -> None:
    """A trainable bf16 student (distributed optimizer): the master weights set from the kept shards, with the
    model's own weights zeroed first, must give back the file's weights after an optimizer step at lr 0."""
    from safetensors.torch import save_file

    from uniapl_megatron.convert.params import high_precision_state_dict, load_from_hf, unwrap
    from uniapl_megatron.convert.safetensors_io import SafetensorsFolder
    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.models.arch import Qwen3Arch
    from uniapl_megatron.models.qwen3 import ModelConfig
    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.trainer.optim import OptimConfig
    from uniapl_megatron.trainer.student import Student

    par = ParallelConfig(
        tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp, virtual_pipeline_model_parallel_size=a.vpp
    )
    init_distributed(par, seed=3)
    arch = Qwen3Arch.from_pretrained(a.hf)
    student = Student(arch, par, ModelConfig(dtype="bf16", spec="torch"), OptimConfig(lr=0.0, clip_grad=0.0))
    kept = {}
    chunks = [unwrap(c) for c in student.chunks]
    load_from_hf(chunks, arch, SafetensorsFolder(a.hf).get, student.num_query_groups, student.padded_vocab, keep=kept)
    assert len(kept) == sum(1 for c in chunks for _ in c.parameters())
    with torch.no_grad():
        for c in chunks:
            for p in c.parameters():
                p.zero_()
    student.optimizer.reload_model_params(high_precision_state_dict(student.chunks, kept))
    student.optimizer.zero_grad()
    student.optimizer.step()
    tensors = {n: t.clone() for n, t in student.hf_tensors()}
    if dist.get_rank() == 0:
        save_file(tensors, f"{a.out}.masters.safetensors")
    dist.barrier()


if __name__ == "__main__":
    main()
