"""Worker (one per rank): one UniAPL training step of the Megatron student on fixed sequences at a given
layout; rank 0 writes the updated weights (HF names) and the step's metrics. Used by tests/test_trainer.py."""

import argparse
import dataclasses
import json
from typing import Any

import torch
import torch.distributed as dist


def count_forwards(student) -> dict[str, int]:
    """Forward calls of this rank's transformer layers and core attentions (recomputation runs them again)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers = [m for c in student.chunks for m in c.modules() if isinstance(m, TransformerLayer)]
    calls = {"layers": len(layers), "layer_forwards": 0, "core_attn_forwards": 0}

    def hook(key):
        return lambda *_: calls.__setitem__(key, calls[key] + 1)

    for layer in layers:
        layer.register_forward_hook(hook("layer_forwards"))
        layer.self_attention.core_attention.register_forward_hook(hook("core_attn_forwards"))
    return calls


def poison_first_gradient(student) -> None:
    """On the first step only, rank 0 writes NaN into one element of its first gradient after backward and
    before finalize's reductions (as a NaN from backward would arrive), leaving the loss finite."""
    param = next(p for c in student.chunks for p in c.parameters() if hasattr(p, "main_grad"))
    finalize, calls = student.config.finalize_model_grads_func, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1 and dist.get_rank() == 0:
            param.main_grad.view(-1)[0] = float("nan")
        return finalize(*args, **kwargs)

    student.config.finalize_model_grads_func = poisoned


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per PP rank (interleaved)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (MoE models)")
    ap.add_argument("--clip", type=float, default=0.0, help="optim.clip_grad (0 = off)")
    ap.add_argument("--preset", default="uniapl", help="objective.algorithm")
    ap.add_argument("--seqs", type=int, default=10, help="sequences in the step")
    ap.add_argument("--demos", type=int, default=3, help="how many of them are demonstrations (the first ones)")
    ap.add_argument("--mb-tokens", type=int, default=4096)
    ap.add_argument("--no-dist-opt", action="store_true")
    ap.add_argument(
        "--nan",
        nargs="?",
        const="loss",
        choices=["loss", "grad"],
        help="poison the first step, which must be skipped: loss (a NaN loss) or grad (a finite loss, "
        "a NaN written into one gradient on rank 0 before the data-parallel reduction)",
    )
    ap.add_argument("--offload", type=float, default=0.0, help="optim.cpu_offload with this fraction (0 = off)")
    ap.add_argument("--overlap", action="store_true", help="optim.cpu_offload_overlap")
    ap.add_argument("--ddp-overlap", action="store_true", help="optim.overlap_comm=on (DDP grad/param overlap)")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps, all on the same batch")
    ap.add_argument(
        "--mb-tokens-later",
        type=int,
        default=0,
        help="micro-batch budget from the second step on (0 = --mb-tokens): other micro-batch counts",
    )
    ap.add_argument("--adam", action="store_true", help="plain Adam (its moments matter from the second step)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of --adam")
    ap.add_argument("--adam-eps", type=float, default=1e-8, help="eps of --adam")
    ap.add_argument("--save", help="write a trainer checkpoint here after the first step")
    ap.add_argument("--sync-save", action="store_true", help="save synchronously (default: async, as the trainer)")
    ap.add_argument("--resume", help="load this folder's latest trainer checkpoint before stepping")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--recompute-layers", type=int, default=1)
    ap.add_argument("--chunk-tokens", type=int, default=2048, help="optim.chunk_tokens of the log-prob head")
    ap.add_argument(
        "--row-pad",
        default="none",
        help="pad each packed row for this FP8 recipe (padding only: the model runs without FP8)",
    )
    return ap.parse_args(argv)


def make_student(a: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Process group and the HF-loaded student at the layout ``a`` names: (student, parallel config, arch)."""
    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.models.arch import Qwen3Arch
    from uniapl_megatron.models.qwen3 import ModelConfig
    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.trainer.optim import OptimConfig
    from uniapl_megatron.trainer.student import Student

    par = ParallelConfig(
        tensor_model_parallel_size=a.tp,
        pipeline_model_parallel_size=a.pp,
        sequence_parallel=a.sp,
        virtual_pipeline_model_parallel_size=a.vpp,
        expert_model_parallel_size=a.ep,
        use_distributed_optimizer=not a.no_dist_opt,
    )
    init_distributed(par, seed=7)
    arch = Qwen3Arch.from_pretrained(a.hf)
    par.validate(arch, dist.get_world_size())
    model_cfg = ModelConfig(dtype=a.dtype, spec="torch", recompute=a.recompute, recompute_num_layers=a.recompute_layers)
    student = Student(
        arch,
        par,
        model_cfg,
        OptimConfig(
            # Adam with a huge eps is SGD with lr/eps: the update is linear in the gradient, so layouts can be
            # compared at 1e-5 (plain Adam's first step is lr*sign(g), which amplifies rounding noise near 0).
            **({"lr": a.lr, "adam_eps": a.adam_eps} if a.adam else {"lr": 500.0, "adam_eps": 1000.0}),
            clip_grad=a.clip,
            chunk_tokens=a.chunk_tokens,
            cpu_offload=a.offload > 0,
            cpu_offload_fraction=a.offload or 1.0,
            cpu_offload_overlap=a.overlap,
            overlap_comm="on" if a.ddp_overlap else "auto",
        ),
    )
    student.load_hf(a.hf)
    return student, par, arch


def fixed_seqs(a: argparse.Namespace, vocab_size: int) -> list:
    """The fixed batch: ``a.seqs`` random sequences of growing length, the first ``a.demos`` demonstrations."""
    from uniapl_megatron.trainer.batch import Seq

    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(a.seqs):
        n, p = 12 + 3 * i, 5 + i % 4
        toks = torch.randint(0, vocab_size, (n,), generator=g).tolist()
        demo = i < a.demos
        seqs.append(
            Seq(
                toks,
                p,
                demo,
                advantage=0.0 if demo else float(torch.randn(1, generator=g)),
                adv_advantage=0.0 if demo else float(torch.randn(1, generator=g)),
            )
        )
    return seqs


def poison_first_rollout(seqs: list) -> list:
    """The batch with a NaN advantage on its first rollout (as a NaN reward would give): a NaN loss."""
    import dataclasses

    first = next((i for i, s in enumerate(seqs) if not s.is_demo), None)
    if first is None:
        raise SystemExit("--nan loss needs a rollout in the batch (--demos below --seqs)")
    return [dataclasses.replace(s, advantage=float("nan")) if i == first else s for i, s in enumerate(seqs)]


def build(a: argparse.Namespace) -> tuple[Any, Any, list, Any, dict[str, int]]:
    """Process group, student, the update that trains it (the trainer's, trainer/update.py), the fixed batch and
    the objective's weights, and the forward counters, at the layout ``a`` names."""
    from uniapl_megatron.objective import ObjectiveConfig, resolve_weights
    from uniapl_megatron.trainer.update import PolicyUpdate

    student, _, arch = make_student(a)
    calls = count_forwards(student)
    cfg = ObjectiveConfig(algorithm=a.preset, lambda_adv=0.5, loss_agg_mode="seq-mean-token-mean")
    update = PolicyUpdate(student, cfg, a.mb_tokens, fp8_recipe=a.row_pad)
    if a.nan == "grad":
        poison_first_gradient(student)
    return student, update, fixed_seqs(a, arch.vocab_size), resolve_weights(cfg, 0), calls


def main() -> None:
    from safetensors.torch import save_file

    from uniapl_megatron.trainer.checkpoint import Checkpointer

    a = parse_args()
    student, update, seqs, weights, calls = build(a)
    if a.resume:
        Checkpointer(a.resume).load_latest(student)
    ckpt = Checkpointer(a.save or a.out, async_save=not a.sync_save)
    per_step = []
    for step in range(1, a.steps + 1):
        if step == 2 and a.mb_tokens_later:
            update = dataclasses.replace(update, max_tokens=a.mb_tokens_later)
        per_step.append(update(poison_first_rollout(seqs) if a.nan == "loss" and step == 1 else seqs, weights))
        if a.save and step == 1:
            ckpt.save(step, student, hf_dir=a.hf)
        ckpt.maybe_finalize()
    ckpt.close()
    mbs = update.pack(seqs)  # the last step's micro-batches (packing is deterministic)
    # per layer, micro-batch and step: 1 without recomputation, 2 for what is recomputed
    extra = {k: v / calls["layers"] / len(mbs) / a.steps for k, v in calls.items() if k != "layers"}
    ddp = student.chunks[0].ddp_config
    extra |= {"overlap_grad_reduce": ddp.overlap_grad_reduce, "overlap_param_gather": ddp.overlap_param_gather}
    if a.offload:  # what the hybrid optimizer really put on the host (this rank's shard)
        hybrid = (
            student.optimizer.chained_optimizers[0].optimizer
            if hasattr(student.optimizer, "chained_optimizers")
            else student.optimizer.optimizer
        )
        extra |= {
            "host_numel": sum(p.numel() for p in hybrid.cpu_copys_map_gpu_param),
            "shard_numel": sum(p.numel() for g in hybrid.param_groups for p in g["params"]),
            "cpu_optimizers": len(hybrid.cpu_optimizers),
            "device_optimizer": hybrid.gpu_optimizer is not None,
        }
    tensors = {name: t.clone() for name, t in student.hf_tensors()}
    if dist.get_rank() == 0:
        save_file(tensors, a.out + ".safetensors")
        with open(a.out + ".json", "w") as f:
            json.dump(
                {
                    **per_step[-1],
                    "steps": per_step,
                    "micro_batches": len(mbs),
                    "rows": [
                        {"seq_lens": mb.packed.seq_lens, "padded": mb.packed.cu_seqlens_padded.diff().tolist()}
                        for mb in mbs
                    ],
                    **extra,
                },
                f,
            )
    dist.barrier()


if __name__ == "__main__":
    main()
