#!/usr/bin/env python
"""Throughput of the verifiable IFEval reward on one CPU core.

Workload: the 541 IFEval prompts and generated training prompts, each with a group of
constructed responses (``eval.constructed``: a response built to follow the constraints, then
variants that break them), scored by a fresh ``ifeval`` reward as GRPO would score groups.
The process is pinned to one core. The last line is JSON; ``responses_per_s`` is the default
reward (strict, binary) on the IFEval prompts, scored in this process (the checkers' own speed).
``pool_*`` is what the trainer pays for the per-sample time limit (rewards/pool.py): a GRPO step of
``--step-samples`` responses scored in the warm pool of 2 worker processes minus the same step scored in
this process, median over steps (the workers are not pinned; ``others_cpu`` is the machine's load).

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
        reward = build_reward("ifeval", options, timeout_s=0)
        t = time.perf_counter()
        reward.score(prompts, responses)
        dt = time.perf_counter() - t
        spent += dt
        best = max(best, len(responses) / dt)
    return best


def pool_overhead(prompts: list[dict], responses: list[str], step: int, steps: int = 8) -> dict[str, float]:
    """Median seconds per GRPO step of ``step`` samples: warm pool vs in this process (checker caches warm)."""
    import statistics

    plain, pooled = build_reward("ifeval", timeout_s=0), build_reward("ifeval")
    try:
        batches = [(prompts[i : i + step], responses[i : i + step]) for i in range(0, len(prompts) - step + 1, step)]
        batches = (batches * (steps // max(len(batches), 1) + 1))[:steps]
        for p, r in batches:  # warm: workers up, checkers built
            plain.score(p, r)
            pooled.score(p, r)
        t_plain, t_pool = [], []
        for p, r in batches:
            t = time.perf_counter()
            plain.score(p, r)
            t_plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            pooled.score(p, r)
            t_pool.append(time.perf_counter() - t)
    finally:
        pooled.close()
    a, b = statistics.median(t_plain), statistics.median(t_pool)
    return {
        "pool_step_samples": step,
        "pool_inprocess_ms_per_step": round(a * 1e3, 1),
        "pool_ms_per_step": round(b * 1e3, 1),
        "pool_overhead_ms_per_step": round((b - a) * 1e3, 1),
        "pool_overhead_ms_per_sample": round((b - a) * 1e3 / step, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="time spent per measurement")
    ap.add_argument("--step-samples", type=int, default=64, help="responses per GRPO step for the pool overhead")
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
        **pool_overhead(ifeval_p, ifeval_r, args.step_samples),
        "cores": 1,
        "others_cpu": meter.share(),
        "settings": {
            "reward": "ifeval",
            "modes": "strict binary (default), loose, fraction",
            "seconds_per_measure": args.seconds,
            "timed": "best pass, fresh checker cache each pass",
        },
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    for k, v in result.items():
        if k.endswith("_per_s"):
            result[k] = round(v, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
