"""Worker (one per rank): the tiled vocab-parallel log-prob kernel at TP = world size over Megatron's real TP
group. Reads inputs written by tests/test_logprobs.py; rank 0 writes each case's output, the hidden gradient
summed over TP (as the head's TP region mapping sums it) and the weight gradient gathered over TP."""

import argparse
import os

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tile", type=int, required=True, help="vocab columns per block (small: several per rank)")
    a = ap.parse_args()

    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file, save_file

    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.trainer import logprobs

    init_distributed(ParallelConfig(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"])))
    logprobs._BLOCK_VALUES = 5 * a.tile  # 5-row chunks
    group, tp, rank = (
        ps.get_tensor_model_parallel_group(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
    )
    x = load_file(a.inputs)
    true_vocab = int(x["true_vocab"])
    rows = x["weight"].shape[0] // tp
    results = {}
    for case, temperature, with_entropy in (("float", 0.7, False), ("per_token", x["temperature"], True)):
        h = x["hidden"].clone().requires_grad_()
        w = x["weight"][rank * rows : (rank + 1) * rows].clone().requires_grad_()
        out = logprobs.vocab_parallel_logprobs(
            h,
            w,
            x["labels"],
            true_vocab=true_vocab,
            temperature=temperature,
            with_entropy=with_entropy,
            chunk_tokens=5,
            tp_group=group,
        )
        (out * x["coef_" + case]).sum().backward()
        gh = h.grad.clone()
        dist.all_reduce(gh, group=group)
        parts = [torch.empty_like(w.grad) for _ in range(tp)]
        dist.all_gather(parts, w.grad.contiguous(), group=group)
        results.update(
            {f"{case}_out": out.detach(), f"{case}_grad_hidden": gh, f"{case}_grad_weight": torch.cat(parts)}
        )
    if rank == 0:
        save_file(results, a.out)
    dist.barrier()


if __name__ == "__main__":
    main()
