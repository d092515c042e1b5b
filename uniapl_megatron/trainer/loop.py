"""The UniAPL step, end to end:

    rollout -> rewards -> discriminator scores -> advantages -> old / reference log-probs
            -> policy update (epochs x minibatches, demos and rollouts in one mixed batch) -> weight sync

Every named algorithm (sft, grpo, a_grpo, chord, staged pipelines, uniapl) is this step with the weights
``objective.presets.resolve_weights`` gives for the step. The rollout part (engines on every rollout-TP group
of ranks, sharded scoring, refit from local shards) is trainer/rollout_step.py; every rank then builds the
same global list of sequences from the gathered results and packs its own data-parallel share.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..data import MixedBatchSampler, formatter_from_config, read_demos, read_prompts
from ..models.arch import Qwen3Arch
from ..objective import StepWeights, resolve_weights, rollout_advantages
from ..rollout.base import EngineNeedsWeights
from .batch import Seq, combine_updates
from .checkpoint import Checkpointer, SaveDeadline, job_end_time
from .config import RunConfig, check_run
from .health import Health
from .logging import RunLogger
from .preflight import preflight_gate
from .rollout_step import RolloutStep, place_engines
from .stages import StageSwitch
from .student import Student
from .update import PolicyUpdate

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """train.max_nonfinite_in_row steps in a row had a NaN/inf loss or were skipped: the run stops."""


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        from ..distributed import init_distributed

        check_run(cfg)  # load_config ran it; a config built in code gets the same refusals
        self.cfg = cfg
        self.stages = StageSwitch(cfg)
        self.denv = init_distributed(cfg.parallel, seed=cfg.train.seed)
        self.rank = dist.get_rank()
        self.arch = Qwen3Arch.from_pretrained(cfg.model.hf_path)
        cfg.parallel.validate(self.arch, dist.get_world_size(), torch.cuda.is_available())
        place_engines(cfg, self.rank, dist.get_world_size())  # refuse an unplaceable rollout before any work
        self.out = Path(cfg.train.output_dir)
        self.log = RunLogger(self.out, cfg, enabled=self.rank == 0)
        self.health = Health(self.out, self.rank, dist.get_world_size(), cfg.train.hang_timeout_s)
        self.ckpt = self._make_checkpointer()

        self.fmt = formatter_from_config(cfg.data, model_dir=cfg.model.hf_path)
        self.demos = read_demos(cfg.data.demo_paths, self.fmt, cfg.data) if cfg.data.demo_paths else None
        self.prompts = read_prompts(cfg.data.prompt_paths, self.fmt, cfg.data) if cfg.data.prompt_paths else None
        self.heldout = self._read_heldout()
        self.sampler = MixedBatchSampler.from_config(
            cfg.data, len(self.prompts) if self.prompts else 0, len(self.demos) if self.demos else 0
        )
        self.stop_ids = tuple(
            sorted(
                {
                    self.fmt.eot_id,
                    *([self.fmt.tokenizer.eos_token_id] if self.fmt.tokenizer.eos_token_id is not None else []),
                }
            )
        )

        self.student = Student(
            self.arch, cfg.parallel, cfg.model, cfg.optim, total_steps=self.stages.first_schedule_updates()
        )
        self._init_weights()
        self.policy_update = PolicyUpdate(
            self.student,
            cfg.objective,
            cfg.data.max_tokens_per_micro_batch,
            cfg.data.pad_multiple,
            self.fmt.pad_id,
            cfg.sampling.temperature,
            cfg.model.fp8,
        )
        self.ref = None
        if cfg.objective.kl_coef > 0:
            self.ref = Student(self.arch, cfg.parallel, cfg.model, None)
            self.ref.copy_weights_from(self.student)

        self.rollout = RolloutStep(cfg, self.fmt, self.prompts, self.stop_ids, self.log, self.health)
        self.engine, self.disc = self.rollout.engine, self.rollout.disc  # this rank's engine (None without)
        self.start_step, self.nonfinite_in_row, self.nonfinite_total = 0, 0, 0

    # ---- set-up -------------------------------------------------------------------------------------

    def _make_checkpointer(self) -> Checkpointer:
        """Collective: the run's checkpointer, its save-by deadline from the job's end time."""
        t = self.cfg.train
        end = [job_end_time(t.job_end_time) if self.rank == 0 else None]  # one squeue call, not one per rank
        dist.broadcast_object_list(end, src=0)
        return Checkpointer(
            self.out,
            t.async_save,
            t.fully_parallel_save,
            t.ckpt_optim_format,
            t.keep_last,
            t.save_every,
            SaveDeadline(end[0], t.save_margin_s),
            on_save=lambda step: self.health.phase("save", step),
        )

    def _init_weights(self) -> None:
        if self.cfg.model.load:
            self.student.load_megatron(self.cfg.model.load)
        else:
            self.student.load_hf(self.cfg.model.hf_path)

    def state_dict(self) -> dict[str, Any]:
        """The run's own part of a checkpoint (the student saves its own): data position, counters, metrics."""
        return {
            "sampler": self.sampler.state_dict(),
            "nonfinite_in_row": self.nonfinite_in_row,
            "nonfinite_total": self.nonfinite_total,
            "history": self.log.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where the checkpoint's ``step`` left off. A checkpoint from the second stage of a staged preset
        holds that stage's schedule, so the stage is set up before the student loads its own state."""
        self.stages.resume(self, state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.start_step = state["step"]
        self.nonfinite_in_row, self.nonfinite_total = state["nonfinite_in_row"], state["nonfinite_total"]
        self.log.restore(state.get("history", []))

    # ---- the step -----------------------------------------------------------------------------------

    def _rollouts(self, step: int, prompt_idx: list[int], weights: Any) -> tuple[list[Seq], dict[str, float]]:
        """Collective: every engine samples and scores its share (rollout_step.py); everyone builds the same
        rollout sequences from the gathered results."""
        rollouts, stats = self.rollout.run(step, prompt_idx, weights, self.student)
        rewards, scores = rollouts.rewards(), rollouts.scores()
        adv = rollout_advantages(rollouts.prompt_positions(), weights, self.cfg.objective, rewards, scores)
        seqs = []
        for j, x in enumerate(rollouts):
            prompt_ids = self.prompts[prompt_idx[x.prompt_pos]].prompt_ids.tolist()
            if not x.token_ids:  # an empty completion carries no token to train
                continue
            seqs.append(
                Seq(
                    prompt_ids + list(x.token_ids),
                    len(prompt_ids),
                    False,
                    float(adv.task[j]),
                    float(adv.adversarial[j]),
                    list(x.logprobs),
                    extra={"prompt_pos": x.prompt_pos},
                )
            )
        lengths = [len(x.token_ids) for x in rollouts]
        stats.update(
            {
                "reward/mean": float(rewards.mean()) if len(rollouts) else 0.0,
                "rollout/response_len": sum(lengths) / max(len(lengths), 1),
                "rollout/truncated": sum(x.finish_reason == "length" for x in rollouts) / max(len(rollouts), 1),
            }
        )
        if scores is not None:
            stats["disc/score_mean"] = float(scores.mean())
        return seqs, stats

    def _fill_logprobs(self, seqs: list[Seq], model: Student, attr: str, temperature: float | None = None) -> None:
        """Per-sequence log-probs of the response tokens under ``model`` (no grad), on every rank, at the
        sampler's temperature (or `temperature`)."""
        t = self.cfg.sampling.temperature if temperature is None else temperature
        mbs = self.policy_update.pack(seqs, t)
        lps = model.logprobs(mbs, temperature=t)
        local: dict[int, list[float]] = {}
        if lps is not None:
            for mb, lp in zip(mbs, lps):
                for i, v in zip(mb.packed.seq_ids, mb.packed.unpack_response(lp)):
                    local[i] = v.float().tolist()
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        merged: dict[int, list[float]] = {}
        for g in gathered:
            merged.update(g)
        for i, s in enumerate(seqs):
            setattr(s, attr, torch.tensor(merged[i]))

    def step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        self.stages.maybe_switch(self, step)
        first_update = step * self.stages.updates  # the objective's steps count optimizer updates
        weights = resolve_weights(cfg.objective, first_update)
        batch = self.sampler.next_batch(
            prompts=None if weights.needs_rollouts else 0, demos=None if weights.needs_demos else 0
        )
        stats: dict[str, float] = {"stage_" + weights.stage: 1.0}
        seqs = [Seq(d.token_ids.tolist(), d.prompt_len, True) for d in (self.demos[i] for i in batch.demo_indices)]
        if weights.needs_rollouts:
            self.health.phase("rollout", step)
            rollouts, rstats = self._rollouts(step, batch.prompt_indices, weights)
            seqs += rollouts
            stats.update(rstats)
        if self.engine is not None:
            # Colocated on GPU: the engine's weights go to host memory and its KV cache is freed while Megatron
            # trains; the sync wakes the weights first and the cache after it (a no-op on CPU and for servers).
            self.engine.sleep()
        t0 = time.perf_counter()
        rl = [s for s in seqs if not s.is_demo]
        off_policy = cfg.train.ppo_epochs * cfg.train.minibatches > 1
        self.health.phase("logprobs", step)
        if rl and off_policy:
            self._fill_logprobs(rl, self.student, "old_logprobs")
            # Engine vs trainer on the same tokens and weights: ~1e-6 in fp32 when the sync is right.
            stats["rollout/logprob_diff_max"] = max(
                float((s.old_logprobs - torch.tensor(s.engine_logprobs)).abs().max()) for s in rl
            )
        if rl and self.ref is not None:
            self._fill_logprobs(rl, self.ref, "ref_logprobs")
        self.health.phase("train", step)
        order = list(range(len(seqs)))
        parts = [order[i :: cfg.train.minibatches] for i in range(cfg.train.minibatches)]
        per_update: list[dict[str, float]] = []
        for _ in range(cfg.train.ppo_epochs):
            for part in parts:
                # CHORD's mu moves per optimizer update
                update_weights = resolve_weights(cfg.objective, first_update + len(per_update))
                per_update.append(self.update([seqs[i] for i in part], update_weights))
        stats.update(combine_updates(per_update))
        stats["time/train_seconds"] = time.perf_counter() - t0
        if self.engine is not None or cfg.rollout is not None:
            self.health.phase("sync", step)
            t1 = time.perf_counter()
            self.sync_weights()
            stats["time/sync_seconds"] = time.perf_counter() - t1
            stats.update(self.rollout.sync_stats)
        return stats

    def update(self, seqs: list[Seq], weights: StepWeights) -> dict[str, float]:
        """Collective: one optimizer update on ``seqs`` (the same global list on every rank; each packs its data-
        parallel share), the objective at ``weights``; its metrics, summed over ranks (update.PolicyUpdate)."""
        return self.policy_update(seqs, weights)

    def sync_weights(self) -> None:
        """Collective: refit every rank's engine from its own training ranks (rollout_step.RolloutStep.sync)."""
        self.rollout.sync(self.student)

    # ---- held-out evaluation ------------------------------------------------------------------------

    def _read_heldout(self) -> Any:
        """The held-out prompts (data.eval_prompt_paths); refused when one of them is also a training prompt."""
        cfg = self.cfg
        if not cfg.data.eval_prompt_paths:
            return None
        if cfg.rollout is None:
            raise ValueError(
                "data.eval_prompt_paths: the held-out evaluation samples through the rollout engine, "
                "and this config has no rollout section"
            )
        rows = read_prompts(cfg.data.eval_prompt_paths, self.fmt, cfg.data)
        trained = {tuple(r.prompt_ids.tolist()) for r in (self.prompts.rows if self.prompts else [])}
        trained |= {tuple(d.prompt_ids.tolist()) for d in (self.demos.rows if self.demos else [])}
        both = [r for r in rows.rows if tuple(r.prompt_ids.tolist()) in trained]
        if both:
            raise ValueError(
                f"data.eval_prompt_paths: {len(both)} of {len(rows)} held-out prompts are also training "
                f"prompts (first: {both[0].path}:{both[0].line}); held-out prompts must not be trained on"
            )
        return rows

    def _eval_due(self, done: int) -> bool:
        every = self.cfg.train.eval_every
        return self.heldout is not None and (done == self.cfg.train.steps or every > 0 and done % every == 0)

    def _heldout_eval(self, step: int) -> dict[str, float]:
        """Collective: the mean reward of train.eval_samples samples per held-out prompt, drawn by the run's own
        rollout engines at the current weights (no second model), each engine its contiguous share seeded by
        global prompt index, so the samples are those of one engine given them all, at every evaluation."""
        from ..eval.heldout import sample_and_score

        if self.heldout is None:
            return {}
        self.health.phase("eval", step)
        t0, rows = time.perf_counter(), self.heldout.rows
        lo, hi = self.rollout.share(len(rows))
        mine: tuple[list[float], str] = ([], "")
        if self.engine is not None and hi > lo:
            try:
                got = sample_and_score(
                    self.engine,
                    rows[lo:hi],
                    self.fmt,
                    self.rollout.reward,
                    self.cfg.sampling,
                    self.cfg.train.eval_samples,
                    self.cfg.train.seed,
                    self.stop_ids,
                    offset=lo,
                )
                mine = (got.rewards if self.rollout.is_source else [], "")
            except EngineNeedsWeights as e:
                mine = ([], str(e))
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        failed = [err for _, err in gathered if err]
        if failed:
            if self.rank == 0:
                log.warning("held-out evaluation skipped: %s", failed[0])
            return {}
        rewards = [r for got, _ in gathered for r in got]
        return {
            "eval/heldout_reward": sum(rewards) / max(len(rewards), 1),
            "time/eval_seconds": time.perf_counter() - t0,
        }

    # ---- the run ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to train.steps (or a signal / the job's deadline); engines and reward workers stop on any exit."""
        try:
            return self._run_steps()
        finally:
            self.health.stop()
            self.rollout.shutdown()

    def _run_steps(self) -> dict[str, Any]:
        steps = self.cfg.train.steps
        self._resume()
        self.ckpt.watch_signals()
        self.health.start()
        startup = self._start_engines()
        t_start, reason = time.perf_counter(), "finished"
        if self.start_step == 0:
            self.log.evaluation(0, self._heldout_eval(0))
        for step in range(self.start_step, steps):
            self._train_step(step, startup)
            startup = {}
            stop = self.ckpt.save_if_due(
                step + 1, step + 1 == steps, self.student, [self], self.cfg.model.hf_path, self.disc
            )
            if stop:
                reason = stop
                break
        self.ckpt.close()
        last_saved = self.ckpt.last_saved_step or self.start_step
        self.health.exit(reason, last_saved)
        self.health.stop()
        return self.log.finish(time.perf_counter() - t_start, last_saved)

    def _resume(self) -> None:
        """Continue from the latest checkpoint (train.resume=auto: the student's state, then this trainer's),
        or start a fresh metrics file."""
        state = None if self.cfg.train.resume == "never" else self.ckpt.load_latest(self.student, [self], self.disc)
        if state is None:
            self.log.restore([])

    def _start_engines(self) -> dict[str, float]:
        """The engines start from the trainer's weights (also after a resume); then engine vs trainer log-probs
        of a few samples, before any step, whose figures go in the first step's row."""
        if self.cfg.rollout is None:
            return {}
        self.health.phase("sync", self.start_step)
        self.sync_weights()
        return preflight_gate(self) if self.start_step < self.cfg.train.steps else {}

    def _train_step(self, step: int, startup: dict[str, float]) -> None:
        """One step, the held-out evaluation when due, and its row in the metrics; stops the run after
        train.max_nonfinite_in_row NaN/inf or skipped steps in a row."""
        t_step = time.perf_counter()
        stats = {**self.step(step), **startup}
        stats["time/step_seconds"] = time.perf_counter() - t_step
        if self._eval_due(step + 1):
            stats.update(self._heldout_eval(step + 1))
        bad = not math.isfinite(stats.get("loss/total", 0.0)) or stats.get("skipped", 0.0) > 0
        self.nonfinite_in_row = self.nonfinite_in_row + 1 if bad else 0
        self.nonfinite_total += int(bad)
        stats.update(nonfinite_in_row=self.nonfinite_in_row, nonfinite_total=self.nonfinite_total)
        self.log.step(step, stats)
        self.ckpt.deadline.record_step(stats["time/step_seconds"])
        limit = self.cfg.train.max_nonfinite_in_row
        if self.nonfinite_in_row >= limit:
            raise NonFiniteLossError(
                f"step {step}: {self.nonfinite_in_row} steps in a row had a NaN/inf loss or were "
                f"skipped (train.max_nonfinite_in_row={limit}); stopping"
            )
