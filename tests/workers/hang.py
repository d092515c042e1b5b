"""Worker (one per rank, gloo): a training-shaped loop of phases and collectives under trainer/health.py's
watchdog. ``--stuck RANK:STEP:HOW`` makes RANK stop arriving at STEP: HOW = sleep (busy in Python outside
any collective, in phase score) or regex (a C call that holds the GIL, in phase score). The test SIGSTOPs a
rank itself. Without a hang it runs --steps steps and exits 0."""

import argparse
import re
import time

import torch
import torch.distributed as dist

from uniapl_megatron.trainer.health import Health


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=10**6)
    ap.add_argument("--stuck", default="")
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    health = Health(a.out, rank, dist.get_world_size(), a.timeout, poll_s=0.5)
    health.start()
    stuck_rank, stuck_step, how = (a.stuck.split(":") + ["", "", ""])[:3] if a.stuck else ("-1", "-1", "")
    x = torch.ones(4)
    for step in range(a.steps):
        for phase in ("rollout", "score", "train", "sync"):
            health.phase(phase, step)
            if rank == int(stuck_rank) and step == int(stuck_step) and phase == "score":
                if how == "sleep":
                    time.sleep(10**6)
                re.match(r"(a|aa)+$", "a" * 200 + "b")  # exponential backtracking, the GIL held throughout
            dist.all_reduce(x)
            time.sleep(0.02)
    health.stop()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
