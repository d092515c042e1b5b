"""Worker (one per rank): the student's log-probs of one mixed micro-batch (teacher demos + rollouts) with
the trainer's per-token temperatures, then one training step of the UniAPL loss on it; rank 0 writes both.
Used by tests/test_trainer_temperature.py."""

import argparse
import json
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--inp", required=True, help="JSON: sequences, prompt lengths, demo flags, temperature")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    a = ap.parse_args()

    from megatron.core import parallel_state as ps

    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.models.arch import Qwen3Arch
    from uniapl_megatron.models.qwen3 import ModelConfig
    from uniapl_megatron.objective import ObjectiveConfig, resolve_weights
    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.trainer.batch import Seq
    from uniapl_megatron.trainer.optim import OptimConfig
    from uniapl_megatron.trainer.student import Student
    from uniapl_megatron.trainer.update import PolicyUpdate

    inp = json.loads(Path(a.inp).read_text())
    par = ParallelConfig(tensor_model_parallel_size=a.tp, sequence_parallel=a.tp > 1)
    init_distributed(par, seed=7)
    arch = Qwen3Arch.from_pretrained(a.hf)
    # chunk_tokens 8: the per-token temperatures cross the head's chunk boundaries.
    student = Student(
        arch, par, ModelConfig(dtype="fp32", spec="torch"), OptimConfig(lr=1e-3, clip_grad=0.0, chunk_tokens=8)
    )
    student.load_hf(a.hf)
    seqs = [Seq(t, p, d, advantage=0.0 if d else 1.0) for t, p, d in zip(inp["seqs"], inp["prompt_lens"], inp["demo"])]
    cfg = ObjectiveConfig(algorithm="uniapl", lambda_adv=0.0)
    update = PolicyUpdate(student, cfg, 4096, temperature=inp["temperature"])
    mbs = update.pack(seqs)
    assert len(mbs) == 1, "the test wants demos and rollouts in one micro-batch"
    out: dict = {}
    lps = student.logprobs(mbs, temperature=inp["temperature"])
    if lps is not None:
        out["logprobs"] = [x.tolist() for x in mbs[0].packed.unpack_response(lps[0])]
    out["sft/nll"] = update(seqs, resolve_weights(cfg, 0))["sft/nll"]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out if ps.get_tensor_model_parallel_rank() == 0 else {})
    if dist.get_rank() == 0:
        merged = {k: v for g in gathered for k, v in g.items() if v is not None}
        Path(a.out).write_text(json.dumps(merged))
    dist.barrier()


if __name__ == "__main__":
    main()
