"""The pre-flight log-prob gate: before the first step (and after a resume), the engines sample a few prompts
and the trainer scores the same tokens; a run whose engine and trainer disagree is refused at start-up.

Engine and trainer log-probs of the same tokens and weights agree to ~1e-5 in float32. The usual reasons they
do not (issue trackers of verl, NeMo-RL, slime): the engine samples at another temperature than the trainer
scores at, or returns raw (temperature-1) log-probs instead of those of the distribution it sampled from,
or the weights / dtype differ. A temperature mismatch shows as the trainer's log-probs at some other
temperature matching the engine's: the gate re-scores the tokens at a few temperatures to name it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
_TEMPERATURE_FACTORS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.25, 1.4, 1.6, 2.0)
_REFINE_STEPS = 6


class PreflightError(RuntimeError):
    """Engine and trainer log-probs disagree before the first step; the message names the likely cause."""


def tolerance(cfg: Any) -> float:
    t = cfg.train.preflight_tolerance
    if t is not None:
        return t
    fp32 = cfg.rollout.dtype == "float32" and cfg.model.dtype == "fp32"
    return 1e-3 if fp32 else 0.5


def _diffs(trainer: Any, seqs: list, temperature: float) -> tuple[float, float]:
    trainer._fill_logprobs(seqs, trainer.student, "old_logprobs", temperature=temperature)
    d = torch.cat([(s.old_logprobs - torch.tensor(s.engine_logprobs)).abs() for s in seqs])
    return float(d.max()), float(d.mean())


def _samples(trainer: Any) -> list:
    """Collective: every engine samples its share of the first prompts; all ranks get every sample as a Seq."""
    from .batch import Seq

    cfg, step = trainer.cfg, trainer.rollout
    n = min(cfg.train.preflight_prompts, len(trainer.prompts))
    sampling = dataclasses.replace(
        cfg.sampling, top_k=0, top_p=1.0, max_new_tokens=min(cfg.sampling.max_new_tokens, 16)
    )
    made, _, _ = step._generate_all(-1, list(range(n)), trainer.student, sampling)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, made if step.is_source else [])
    seqs = []
    for x in sorted((x for g in gathered for x in g), key=lambda x: x.key):
        if x.token_ids:
            prompt = trainer.prompts[x.prompt_pos].prompt_ids.tolist()
            seqs.append(Seq(prompt + list(x.token_ids), len(prompt), False, engine_logprobs=list(x.logprobs)))
    return seqs


def _fit_temperature(trainer: Any, seqs: list) -> tuple[float, float]:
    """(temperature, max |diff|) at which the trainer's log-probs best match the engine's: a grid around
    sampling.temperature (and 1), then a ternary search between the best point's neighbours."""
    t = trainer.cfg.sampling.temperature
    grid = sorted({1.0, t, *(round(t * f, 4) for f in _TEMPERATURE_FACTORS)})
    scores = [_diffs(trainer, seqs, x)[0] for x in grid]
    i = min(range(len(grid)), key=scores.__getitem__)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = (scores[i], grid[i])
    for _ in range(_REFINE_STEPS):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        fa, fb = _diffs(trainer, seqs, a)[0], _diffs(trainer, seqs, b)[0]
        best = min(best, (fa, a), (fb, b))
        lo, hi = (lo, b) if fa <= fb else (a, hi)
    return best[1], best[0]


def _cause(trainer: Any, seqs: list, tol: float, max_diff: float) -> str:
    """The likely cause of a disagreement, from re-scoring the tokens at other temperatures."""
    t = trainer.cfg.sampling.temperature
    fit, diff = _fit_temperature(trainer, seqs)
    if diff <= max(tol, 0.2 * max_diff) and abs(fit - t) > 0.01 * t:
        raw = (
            " - or returns raw (temperature-1) log-probs instead of those of the distribution it sampled from"
            if abs(fit - 1.0) <= 0.02
            else ""
        )
        return (
            f"temperature: the engine's log-probs match the trainer's at temperature {fit:.3g} (max |diff| "
            f"{diff:.3g}), not at sampling.temperature={t}: the engine samples at temperature {fit:.3g} while "
            f"the trainer scores at {t}{raw}"
        )
    return (
        f"weights or dtype: no temperature explains it (best fit {fit:.3g}, max |diff| {diff:.3g}); "
        f"engine dtype rollout.dtype={trainer.cfg.rollout.dtype}, trainer model.dtype={trainer.cfg.model.dtype}"
        f" - check the weight sync (rollout.verify_weights) and both dtypes"
    )


def preflight_gate(trainer: Any) -> dict[str, float]:
    """Collective: sample, score, compare; refuses the run (PreflightError) when the max |diff| exceeds
    train.preflight_tolerance. Returns preflight/logprob_max_diff and _mean_diff ({} when off or nothing to
    sample), which the trainer logs with the first step."""
    cfg = trainer.cfg
    tol = tolerance(cfg)
    if tol == 0 or cfg.rollout is None or not trainer.prompts:
        return {}
    seqs = _samples(trainer)
    if not seqs:
        return {}
    max_diff, mean_diff = _diffs(trainer, seqs, cfg.sampling.temperature)
    out = {"preflight/logprob_max_diff": max_diff, "preflight/logprob_mean_diff": mean_diff}
    if trainer.rank == 0:
        log.info(
            "pre-flight: %d samples, engine vs trainer log-probs max |diff| %.3g, mean %.3g (tolerance %g)",
            len(seqs),
            max_diff,
            mean_diff,
            tol,
        )
    if max_diff > tol:
        cause = _cause(trainer, seqs, tol, max_diff)
        raise PreflightError(
            f"pre-flight log-prob gate: engine and trainer log-probs of the same {len(seqs)} "
            f"samples differ by max |diff| {max_diff:.3g} (mean {mean_diff:.3g}) > "
            f"train.preflight_tolerance={tol:g} at sampling.temperature="
            f"{cfg.sampling.temperature}. Likely cause: {cause}"
        )
    return out
