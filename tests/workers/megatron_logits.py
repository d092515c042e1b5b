"""Worker (one per rank): load a converted checkpoint at a layout, run a forward over given tokens, and
have the last pipeline stage write the TP-gathered logits to a file. Used by tests/test_convert.py."""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mcore", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    a = ap.parse_args()

    from uniapl_megatron.convert.checkpoint import build_from_checkpoint
    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.parallel import ParallelConfig

    par = ParallelConfig(
        tensor_model_parallel_size=a.tp,
        pipeline_model_parallel_size=a.pp,
        expert_model_parallel_size=a.ep,
        sequence_parallel=a.sp,
    )
    init_distributed(par)
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    arch, chunks, _ = build_from_checkpoint(a.mcore, par)
    tokens = torch.load(a.tokens, weights_only=True)
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, -1)
    for c in chunks:
        c.eval()
    captured = {}

    def forward_step(data_iter, model):
        out = model(tokens, positions, attention_mask=None)

        def loss_fn(output):
            captured["logits"] = output.detach()
            return output.sum() * 0.0, {}

        return out, loss_fn

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=chunks,
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
    )
    if ps.is_pipeline_last_stage():
        logits = captured["logits"]
        parts = [torch.empty_like(logits) for _ in range(a.tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        full = torch.cat(parts, dim=-1)[..., : arch.vocab_size]
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            torch.save(full, Path(a.out))
    dist.barrier()


if __name__ == "__main__":
    main()
