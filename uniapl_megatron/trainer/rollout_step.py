"""The rollout part of the step, spread over every training rank (DESIGN.md, "Where each piece of work runs").

Colocated: each rollout-TP group of training ranks runs one engine, in-process (vLLM's external launcher, or
the torch engine), placed by rollout/placement.py. Engine e generates the contiguous share e of the step's
prompts, seeded by the prompts' positions in the whole step, so the samples do not depend on the number of
engines. The engine's ranks split its samples and score them (reward, discriminator); all ranks then gather
the small results (token ids, log-probs, rewards, scores, finish reasons) and compute the advantages
themselves. Disaggregated: rank 0 drives the rollout servers (one engine per rollout-TP group of rollout
GPUs, prompts split over them the same way), broadcasts the token ids, and every training rank scores a share.

Refit: every rank iterates Student.hf_tensors (TP all-gather, PP-stage broadcast in buckets) and each engine
loads what its own ranks gathered, in-process; a rank holds at most a bucket plus one tensor's gathered copies
(rollout/refit_held_mib). With rollout.multiprocess (CPU only) the engine's leader rank runs it in child
processes; a dead engine core restarts there, and every rank re-syncs the engines that lost their weights
before those generate their share again: the step is not lost.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..eval.heldout import prompt_text
from ..rollout.base import ENGINES, EngineNeedsWeights, RolloutEngine, SamplingParams
from ..rollout.digest import RefitMismatchError, SentDigests, compare, digest_stream, unverified
from ..rollout.placement import EnginePlacement, PlacementError, place_colocated, split_bounds, visible_devices
from ..rollout.weight_sync import HeldBytes
from .scored import RankShare, ScoredRollouts, ScoredSample

if TYPE_CHECKING:
    from ..discriminator.base import Discriminator

log = logging.getLogger(__name__)


def refit(
    engine: Any, student: Any, bucket_bytes: int, digests: SentDigests | None = None, dtype: torch.dtype | None = None
) -> int:
    """Collective over the training ranks: stream the student's weights (TP all-gather, PP-stage broadcast in
    buckets of bucket_bytes) into this rank's engine, in-process (None: only take part in the gathers).
    With `digests`, each tensor's digest as an engine of weight dtype `dtype` holds it is recorded there as
    it is sent (rollout/digest.py). Returns the most bytes this rank held for the sync at once
    (weight_sync.HeldBytes). An engine error is
    raised after this rank has taken part in every gather, so the other ranks never wait on it."""
    tracker = HeldBytes(p for c in student.chunks for p in c.parameters())
    tensors = tracker.track(student.hf_tensors(bucket_bytes=bucket_bytes, track=tracker.add))
    if engine is not None and digests is not None:
        tensors = digest_stream(tensors, digests, dtype)
    try:
        if engine is not None:
            engine.update_weights(tensors)  # wakes the weights first when the engine sleeps
            engine.wake()  # then the KV cache
    finally:
        for _ in tensors:
            pass
    return tracker.peak


def place_engines(cfg: Any, rank: int, world: int) -> EnginePlacement | None:
    """This rank's colocated engine (None: no rollout, or disaggregated); raises PlacementError, with the
    field to change, for a layout that cannot be placed or run. Cheap: the trainer calls it first thing."""
    r = cfg.rollout
    if r is None or r.mode != "colocated":
        return None
    on_gpu = torch.cuda.is_available() and r.device != "cpu"
    if r.multiprocess and on_gpu:
        raise PlacementError(
            "rollout.multiprocess: true would give the engine's child processes training GPUs "
            "of their own; colocated engines run in-process on GPUs (set it false)"
        )
    ENGINES.get(r.engine, "rollout.engine").check_colocated(r)
    visible = visible_devices(dict(os.environ), torch.cuda.device_count() if on_gpu else 0)
    return place_colocated(
        rank,
        world,
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
        visible,
        cfg.parallel.tensor_model_parallel_size,
        r.tensor_parallel_size,
    )


class RolloutStep:
    """Engines, reward and discriminator of this rank, and the collective rollout of one step."""

    def __init__(
        self, cfg: Any, fmt: Any, prompts: Any, stop_ids: tuple[int, ...], logger: Any, health: Any = None
    ) -> None:
        from ..rewards import build_reward

        self.cfg, self.fmt, self.prompts, self.stop_ids, self.log = cfg, fmt, prompts, stop_ids, logger
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # a warm pool of checker processes: a check past reward.timeout_s scores 0 and is counted
        self.reward = build_reward(cfg.reward.name, cfg.reward.options, cfg.reward.timeout_s, cfg.reward.workers)
        self.health = health  # the trainer's hang watchdog (trainer/health.py), told when scoring starts
        self.disc: Discriminator | None = None
        if cfg.discriminator is not None:
            from ..discriminator import build_discriminator

            self.disc = build_discriminator(cfg.discriminator)  # every rank scores its own share
        self.engine: RolloutEngine | None = None
        self.placement: EnginePlacement | None = None
        self.num_engines = 0
        self.scorers: tuple[int, ...] = (self.rank,)  # ranks that split the samples of this rank's engine
        self.source = self.rank  # the rank whose engine made them
        self._group: Any = None  # to broadcast them from `source` to `scorers`; None: each scorer has them
        self.needs_sync = False  # this rank's engine missed a sync (it failed, or the engine restarted empty)
        self.held_peak = 0
        self.syncs = 0  # completed syncs (rollout.verify_weights "first" checks only the first)
        self.sync_stats: dict[str, float] = {}
        self._warned_unverified = False
        if cfg.rollout is not None:
            self._start()

    # ---- engines ------------------------------------------------------------------------------------------
    def _start(self) -> None:
        from ..rollout import build_engine

        r = self.cfg.rollout
        if r.mode == "disaggregated":
            self.scorers, self.source = tuple(range(self.world)), 0
            self._group = dist.group.WORLD if self.world > 1 else None
            if self.rank == 0:
                self.engine = build_engine(r)
            count = [self.engine.num_engines if self.engine is not None else 0]
            dist.broadcast_object_list(count, src=0)
            self.num_engines = count[0]
            return
        self.placement = p = place_engines(self.cfg, self.rank, self.world)
        assert p is not None
        self.num_engines, self.scorers, self.source = p.num_engines, p.ranks, p.leader
        if r.multiprocess and r.tensor_parallel_size > 1:  # only the leader sees the samples: it sends them
            groups = [
                dist.new_group(list(range(e * r.tensor_parallel_size, (e + 1) * r.tensor_parallel_size)))
                for e in range(p.num_engines)
            ]
            self._group = groups[p.engine]
        if not r.multiprocess or self.rank == p.leader:
            self.engine = build_engine(dataclasses.replace(r, device=p.device))
        if self.rank == 0:
            log.info(
                "rollout: %d colocated %s engine(s) of %d rank(s) each%s",
                p.num_engines,
                r.engine,
                r.tensor_parallel_size,
                " (child processes)" if r.multiprocess else " (in-process)",
            )

    def sync(self, student: Any, only_if_needed: bool = False) -> None:
        """Collective: refit every engine (or, with only_if_needed, those that missed a sync) from its ranks,
        then verify what each engine holds when rollout.verify_weights asks for it (RefitMismatchError)."""
        load = self.engine is not None and (self.needs_sync or not only_if_needed)
        r = self.cfg.rollout
        bucket = r.bucket_bytes if r is not None else 0
        verify = r is not None and (r.verify_weights == "every" or r.verify_weights == "first" and self.syncs == 0)
        sent: SentDigests | None = SentDigests() if verify and load and self.engine.verifies_weights else None
        dtype = getattr(torch, r.dtype) if r is not None else None
        try:
            self.held_peak = refit(self.engine if load else None, student, bucket, sent, dtype)
            self.needs_sync = self.needs_sync and not load
        except Exception as e:  # noqa: BLE001 - e.g. the engine died mid-sync; the next rollout re-syncs it
            self.needs_sync = True
            sent = None
            log.warning(
                "rank %d: weight sync into the rollout engine failed (%s: %s); the next rollout re-syncs",
                self.rank,
                type(e).__name__,
                e,
            )
        if verify:
            self._verify(sent, dtype)
        self.syncs += 1

    def _verify(self, sent: SentDigests | None, dtype: Any) -> None:
        """Collective: this rank's engine digests what it holds and compares (rollout/digest.py); every rank
        raises RefitMismatchError when any engine holds other weights than its ranks sent."""
        t0 = time.perf_counter()
        bad: list[str] = []
        if sent:
            held = self.engine.weight_digests()
            engine = f"engine {self.placement.engine if self.placement else 0} (rank {self.rank})"
            if held is None:
                self._warn_once(f"rollout.verify_weights: {engine} holds tensor-parallel shards; not verified")
            else:
                bad = compare(sent, held, dtype, engine)
                skipped = unverified(sent, held)
                if skipped:
                    self._warn_once(
                        f"rollout.verify_weights: {len(skipped)} tensor(s) have no digest in the engine's "
                        f"layout (e.g. {skipped[0]}); not verified"
                    )
        digest_s = time.perf_counter() - t0 + (sent.seconds if sent else 0.0)  # engine's + trainer's digests
        flag = torch.tensor([len(bad), int(digest_s * 1e6)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # gloo world: a tiny CPU tensor is enough
        self.sync_stats = {"sync/digest_seconds": flag[1].item() / 1e6, "sync/verified": 1.0}
        if flag[0].item():
            msgs: list[Any] = [None] * self.world
            dist.all_gather_object(msgs, bad)
            lines = [m for g in msgs for m in g]
            raise RefitMismatchError(
                f"weight sync: {len(lines)} tensor(s) held by the rollout engine differ from "
                f"what the trainer sent: " + "; ".join(lines[:5])
            )

    def _warn_once(self, msg: str) -> None:
        if not self._warned_unverified:
            log.warning(msg)
            self._warned_unverified = True

    def sleep(self) -> None:
        if self.engine is not None:
            self.engine.sleep()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        self.reward.close()  # its worker processes

    # ---- one step ---------------------------------------------------------------------------------------
    @property
    def is_source(self) -> bool:
        """Whether this rank reports its engine's samples (one rank per engine)."""
        return self.rank == self.source and self.engine is not None

    def share(self, n_prompts: int) -> tuple[int, int]:
        """Prompt positions [lo, hi) of a list of n_prompts this rank's engine generates."""
        if self.placement is None:  # disaggregated: rank 0's client splits over the servers itself
            return 0, n_prompts
        b = split_bounds(n_prompts, self.num_engines)
        return b[self.placement.engine], b[self.placement.engine + 1]

    def _generate(self, step: int, prompt_idx: list[int], sampling: Any) -> list[ScoredSample] | None:
        """This rank's engine's samples under ``sampling`` (SamplingConfig), not scored yet; [] without an engine or
        prompts; None when the engine needs the weights again."""
        lo, hi = self.share(len(prompt_idx))
        if self.engine is None or hi == lo:
            return []
        if self.needs_sync:
            return None
        try:
            batch = self.engine.generate(
                [self.prompts[i].prompt_ids.tolist() for i in prompt_idx[lo:hi]],
                SamplingParams(
                    n=sampling.group_size,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    max_new_tokens=sampling.max_new_tokens,
                    stop_token_ids=self.stop_ids,
                    seed=self.cfg.train.seed + step,
                    prompt_index_offset=lo,
                ),
            )
        except EngineNeedsWeights as e:
            log.warning("rank %d, step %d: %s; re-syncing from the engine's ranks", self.rank, step, e)
            self.needs_sync = True
            return None
        seen: dict[int, int] = {}
        out = []
        for x in batch.samples:
            j = seen[x.prompt_index] = seen.get(x.prompt_index, -1) + 1
            out.append(ScoredSample(lo + x.prompt_index, j, list(x.token_ids), list(x.logprobs), x.finish_reason))
        return out

    def _generate_all(
        self, step: int, prompt_idx: list[int], student: Any, sampling: Any = None
    ) -> tuple[list[ScoredSample], int, float]:
        """Every engine generates its share (at ``sampling``, default the run's); engines that lost their weights
        are re-synced (collectively) and retry, the others keep what they made. Returns (this rank's engine's
        samples, re-syncs, seconds)."""
        sampling = sampling if sampling is not None else self.cfg.sampling
        limit = max(1, self.cfg.rollout.max_restarts)
        made: list[ScoredSample] | None = None
        t0 = time.perf_counter()
        for resyncs in range(limit + 1):
            if made is None:
                made = self._generate(step, prompt_idx, sampling)
            failed = torch.tensor([made is None], dtype=torch.int64)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # gloo world: a tiny CPU tensor is enough
            if not failed.item():
                return made or [], resyncs, time.perf_counter() - t0
            if resyncs == limit:
                raise RuntimeError(
                    f"step {step}: a rollout engine still had no usable weights after {limit} "
                    f"re-sync(s) (rollout.max_restarts); see the warnings above"
                )
            self.sync(student, only_if_needed=True)
        raise AssertionError("unreachable")

    def _score(self, made: list[ScoredSample], prompt_idx: list[int], needs_disc: bool) -> list[ScoredSample]:
        """Reward and discriminator score of this rank's part of its engine's samples."""
        if self._group is not None:
            box = [made if self.rank == self.source else None]
            dist.broadcast_object_list(box, src=self.source, group=self._group)
            made = box[0]
        b = split_bounds(len(made), len(self.scorers))
        k = self.scorers.index(self.rank)
        mine = made[b[k] : b[k + 1]]
        rows = [self.prompts[prompt_idx[m.prompt_pos]] for m in mine]
        texts = [self.fmt.decode(m.token_ids, skip_special_tokens=True) for m in mine]
        rewards = (
            self.reward.score(
                [
                    {"instruction_id_list": r.instruction_id_list, "kwargs": r.kwargs, "prompt": prompt_text(r)}
                    for r in rows
                ],
                texts,
            )
            if mine
            else []
        )
        scores: list[float | None] = [None] * len(mine)
        if needs_disc and mine:
            scores = self.disc.score([prompt_text(r) for r in rows], [r.teacher_response or "" for r in rows], texts)
        self._texts = {m.key: t for m, t in zip(mine, texts)}  # for the discriminator's update
        return [
            dataclasses.replace(m, reward=float(rw), score=None if sc is None else float(sc))
            for m, rw, sc in zip(mine, rewards, scores)
        ]

    def run(self, step: int, prompt_idx: list[int], weights: Any, student: Any) -> tuple[ScoredRollouts, dict]:
        """Collective: generate, score and gather the step's samples, in (prompt position, sample) order."""
        made, resyncs, gen_s = self._generate_all(step, prompt_idx, student)
        if self.health is not None:
            self.health.phase("score", step)
        mine = self._score(made, prompt_idx, weights.needs_discriminator)
        share = RankShare(
            mine, self.engine.restarts if self.is_source else 0, gen_s, self.held_peak, self.reward.take_stats()
        )
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, share)
        samples = sorted((x for g in gathered for x in g.samples), key=lambda x: x.key)
        expected = len(prompt_idx) * self.cfg.sampling.group_size
        if len(samples) != expected:
            raise RuntimeError(f"step {step}: gathered {len(samples)} rollout samples, expected {expected}")
        b = split_bounds(len(prompt_idx), self.num_engines or 1)
        shares = [b[k + 1] - b[k] for k in range(len(b) - 1)]
        stats = {
            "rollout/engines": float(sum(n > 0 for n in shares)),
            "rollout/prompts_per_engine_max": float(max(shares)),
            "rollout/gen_seconds": max(g.gen_seconds for g in gathered),
            "rollout/engine_restarts": float(sum(g.restarts for g in gathered)),
            "rollout/resyncs": float(resyncs),
            "rollout/refit_held_mib": max(g.held_peak_bytes for g in gathered) / 2**20,
        }  # last sync, fullest
        for g in gathered:  # reward/timeouts, reward/worker_crashes: summed over the ranks that scored
            for key, value in g.reward_stats.items():
                stats[key] = stats.get(key, 0.0) + value
        if self.disc is not None and self.disc.trainable:
            stats.update(self._update_disc(step, samples, prompt_idx, {x.key for x in mine}))
        self._log(step, samples, prompt_idx)
        return ScoredRollouts(samples), stats

    def _update_disc(
        self, step: int, samples: list[ScoredSample], prompt_idx: list[int], mine: set[tuple[int, int]]
    ) -> dict[str, float]:
        """The online discriminator learns from every sample, each rank computing the gradient of the samples
        it scored (their texts are here); the gradients are summed, so every copy takes the same update."""
        rows = [self.prompts[prompt_idx[x.prompt_pos]] for x in samples]
        owned = [x.key in mine for x in samples]
        candidates = [self._texts[x.key] if o else "" for x, o in zip(samples, owned)]
        upd = self.disc.update(
            step,
            [prompt_text(r) for r in rows],
            [r.teacher_response or "" for r in rows],
            candidates,
            owned=owned,
            group=dist.group.WORLD if self.world > 1 else None,
        )
        return dict(upd or {})

    def _log(self, step: int, samples: list[ScoredSample], prompt_idx: list[int]) -> None:
        """Rank 0 logs the first train.log_samples samples (and, with train.log_rollouts, all of them)."""
        if self.rank != 0:
            return
        first = samples[: self.cfg.train.log_samples]
        self.log.samples(
            step,
            [
                {
                    "prompt": prompt_text(self.prompts[prompt_idx[x.prompt_pos]]),
                    "response": self.fmt.decode(x.token_ids, skip_special_tokens=True),
                    "reward": x.reward,
                }
                for x in first
            ],
        )
        if self.cfg.train.log_rollouts:
            self.log.rollouts(
                step,
                [
                    {
                        "step": step + 1,
                        "prompt_index": x.prompt_pos,
                        "sample_index": x.sample_index,
                        "dataset_index": prompt_idx[x.prompt_pos],
                        "token_ids": x.token_ids,
                        "reward": x.reward,
                    }
                    for x in samples
                ],
            )
