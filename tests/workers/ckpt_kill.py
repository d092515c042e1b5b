"""Worker (one per rank) for the kill-during-async-save test: resumes from <out>/checkpoints/latest if there
is one and checks that what it loaded is exactly what the run held at that step (a digest of this rank's
weights and optimizer shard, written before that save began); then trains on the fixed batch of
train_step.py, saving asynchronously after every step, until killed (or for --steps). Rank 0 appends
events (save: a save begins, finalizing the previous one first; writing: its writer runs in the background
while the next step trains; finalized) with times to <out>/events.txt. Exit 3: the loaded state differs from the
digest."""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from train_step import build, parse_args


def digest(student) -> dict[str, float]:
    """Sums of this rank's weights and optimizer state (float64): equal iff the same values were restored."""
    out = {"weights": sum(float(p.detach().double().sum()) for c in student.chunks for p in c.parameters())}
    for opt in getattr(student.optimizer, "chained_optimizers", [student.optimizer]):
        for i, state in enumerate(opt.optimizer.state.values()):
            for k in ("exp_avg", "exp_avg_sq"):
                out[f"{k}"] = out.get(k, 0.0) + float(state[k].double().sum()) * (1 + i % 7)
    return out


def main() -> None:
    argv = sys.argv[1:]
    verify_only = "--verify-only" in argv
    if verify_only:
        argv.remove("--verify-only")
    a = parse_args(argv)
    from uniapl_megatron.trainer.checkpoint import Checkpointer

    student, update, seqs, weights, _ = build(a)
    out, rank = Path(a.out), dist.get_rank()
    events = open(out / "events.txt", "a") if rank == 0 else None  # noqa: SIM115

    def event(what: str, step: int) -> None:
        if events:
            events.write(f"{time.time():.4f} {what} {step}\n")
            events.flush()

    ckpt = Checkpointer(out, async_save=True, keep_last=2)
    start = 0
    state = ckpt.load_latest(student)
    if state is not None:
        start = state["step"]
        want = json.loads((out / f"digest_rank{rank}_step{start}.json").read_text())
        got = digest(student)
        if got != want:
            print(
                f"rank {rank}: checkpoint step_{start:06d} loaded {got}, but step {start} held {want}", file=sys.stderr
            )
            sys.exit(3)
        event("resumed", start)
    if verify_only:
        return
    for step in range(start + 1, start + 1 + a.steps):
        update(seqs, weights)
        (out / f"digest_rank{rank}_step{step}.json").write_text(json.dumps(digest(student)))
        before = ckpt.pending_step
        event("save", step)
        ckpt.save(step, student, hf_dir=a.hf)
        if before is not None:
            event("finalized", before)  # save() completes the previous one first
        event("writing", step)  # its blocking part is done: the writer process runs while training goes on
    ckpt.close()
    event("finalized", start + a.steps)
    torch.distributed.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
