#!/usr/bin/env python
"""Throughput of the verifiable IFEval reward on one CPU core.

Workload: the 541 IFEval prompts and generated training prompts, each with a group of
constructed responses (``eval.constructed``: a response built to follow the constraints, then
variants that break them), scored by a fresh ``ifeval`` reward as GRPO would score groups.
The process is pinned to one core. The last line is JSON; ``responses_per_s`` is the default
reward (strict, binary) on the IFEval prompts.

  python benchmarks/rewards.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Any

from _machine import OthersCpu, machine
from uniapl_megatron.eval.constructed import constructed_responses
from uniapl_megatron.eval.ifeval_data import load_ifeval_prompts
from uniapl_megatron.rewards import build_reward
from uniapl_megatron.rewards.prompts import PromptGenConfig, generate_training_prompts


def workload(rows: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    rng = random.Random(seed)
    prompts, responses = [], []
    for row in rows:
        for resp in constructed_responses(row, rng):  # one group per prompt
            prompts.append(row)
            responses.append(resp)
    return prompts, responses


def measure(options: dict[str, Any], prompts: list[dict], responses: list[str], seconds: float) -> float:
    """Responses per second, fresh reward (cold checker cache) each pass, best of the passes."""
    best, spent = 0.0, 0.0
    while spent < seconds or best == 0.0:
        reward = build_reward("ifeval", options)
        t = time.perf_counter()
        reward.score(prompts, responses)
        dt = time.perf_counter() - t
        spent += dt
        best = max(best, len(responses) / dt)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="time spent per measurement")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    ifeval_p, ifeval_r = workload(load_ifeval_prompts(), seed=0)
    train_rows, _ = generate_training_prompts(PromptGenConfig(num_prompts=300, seed=1))
    train_p, train_r = workload(train_rows, seed=1)
    meter = OthersCpu()
    result = {
        "responses_per_s": measure({}, ifeval_p, ifeval_r, args.seconds),
        "loose_responses_per_s": measure({"mode": "loose"}, ifeval_p, ifeval_r, args.seconds),
        "fraction_responses_per_s": measure({"aggregate": "fraction"}, ifeval_p, ifeval_r, args.seconds),
        "train_prompts_responses_per_s": measure({}, train_p, train_r, args.seconds),
        "responses": len(ifeval_r),
        "group_size": len(ifeval_r) // len({id(p) for p in ifeval_p}),
        "cores": 1,
        "others_cpu": meter.share(),
        "settings": {"reward": "ifeval", "modes": "strict binary (default), loose, fraction",
                     "seconds_per_measure": args.seconds, "timed": "best pass, fresh checker cache each pass"},
        "machine": machine(), "date": time.strftime("%Y-%m-%d"),
    }
    for k, v in result.items():
        if k.endswith("_per_s"):
            result[k] = round(v, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
