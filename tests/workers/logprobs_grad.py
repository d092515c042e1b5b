"""Worker (one per TP rank): vocab-parallel log-probs and entropy (trainer/logprobs.py) of fixed hidden states,
their gradients, and the same through full logits with plain autograd. Rank 0 writes both. Used by
tests/test_logprobs.py."""

import argparse
import os

import torch
import torch.distributed as dist


def reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab: int,
              temperature: float) -> torch.Tensor:
    """[N, 2] log-prob of each label and entropy, from the full [N, vocab] logits (vocabulary padding cut)."""
    logp = torch.log_softmax(hidden @ weight[:vocab].t() / temperature, dim=-1)
    return torch.stack([logp.gather(1, labels[:, None])[:, 0], -(logp.exp() * logp).sum(-1)], dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--chunk-tokens", type=int, default=7, help="tokens per chunk (below N: chunked + recomputed)")
    a = ap.parse_args()

    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.trainer.logprobs import vocab_parallel_logprobs

    tp = int(os.environ["WORLD_SIZE"])
    init_distributed(ParallelConfig(tensor_model_parallel_size=tp), seed=3)
    g = torch.Generator().manual_seed(0)
    n, h, vocab, padded, temperature = 20, 16, 50, 64, 0.7  # 14 padding rows, all on the last rank
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(padded, h, generator=g)
    weight[vocab:] = 0.0  # what the converter puts in padding rows
    labels = torch.randint(0, vocab, (n,), generator=g)
    coef = torch.randn(n, 2, generator=g)  # a loss that weighs log-probs and entropies differently

    rank = ps.get_tensor_model_parallel_rank()
    h_mine = hidden.clone().requires_grad_(True)
    w_mine = weight.chunk(tp)[rank].clone().requires_grad_(True)
    out = vocab_parallel_logprobs(h_mine, w_mine, labels, true_vocab=vocab, temperature=temperature,
                                  with_entropy=True, chunk_tokens=a.chunk_tokens,
                                  tp_group=ps.get_tensor_model_parallel_group())
    (out * coef).sum().backward()
    # hidden's gradient is per rank partial (the model's TP region mapping sums it); the weight's is per slice
    grad_hidden = h_mine.grad.clone()
    dist.all_reduce(grad_hidden, group=ps.get_tensor_model_parallel_group())
    slices = [torch.empty_like(w_mine.grad) for _ in range(tp)]
    dist.all_gather(slices, w_mine.grad.contiguous(), group=ps.get_tensor_model_parallel_group())

    h_ref, w_ref = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = reference(h_ref.double(), w_ref.double(), labels, vocab, temperature)
    (ref * coef.double()).sum().backward()
    if dist.get_rank() == 0:
        save_file({"out": out.detach(), "grad_hidden": grad_hidden, "grad_weight": torch.cat(slices),
                   "ref_out": ref.detach().float(), "ref_grad_hidden": h_ref.grad,
                   "ref_grad_weight": w_ref.grad}, a.out)
    dist.barrier()


if __name__ == "__main__":
    main()
