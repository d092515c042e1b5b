"""The objective's configuration: one dataclass, validated when built.

Every field says what it does and where the idea comes from. The algorithm preset
(``algorithm``) decides which terms are on at a given step (see ``presets.py``); the other
fields shape the terms themselves (``losses.py``) and the advantages (``advantages.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALGORITHMS = (
    "sft",
    "a_sft",
    "grpo",
    "a_grpo",
    "sft->grpo",
    "sft->a_grpo",
    "a_sft->a_grpo",
    "chord",
    "a_chord",
    "uniapl",
)
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADV_NORMS = ("std", "mean")
ADVERSARIAL_MODES = ("loss", "reward")
SCHEDULES = ("constant", "linear", "cosine")
SFT_TOKEN_WEIGHTINGS = ("none", "chord_phi")


class ObjectiveConfigError(ValueError):
    """A bad value in the objective's configuration; the message names the field."""


@dataclass
class ObjectiveConfig:
    # --- which algorithm (presets.py turns it into per-step weights) ---
    # One of ALGORITHMS. `uniapl` (arXiv 2509.25148) mixes SFT, GRPO and the adversarial term in every
    # step; the others are the paper's baselines. `x->y` presets run x until `stage_switch_step`, then y.
    algorithm: str = "uniapl"
    # Weight of the SFT NLL on teacher demonstrations (UniAPL's SFT:RL balance; unknown in the paper).
    w_sft: float = 1.0
    # Weight of the GRPO policy-gradient term driven by the verifiable task reward.
    w_rl: float = 1.0
    # Weight of the adversarial term (discriminator scores -> group advantages -> its own clipped
    # policy-gradient loss). UniAPL: a separate term works better than adding scores to the reward,
    # and too large a value hurts.
    lambda_adv: float = 0.1
    # "loss": the adversarial signal is its own term (UniAPL). "reward": ablation, the scores times
    # lambda_adv are added to the task reward before the group normalisation, and no separate term.
    adversarial_mode: str = "loss"
    # Staged presets (`sft->grpo`, ...): the optimizer update at which the second stage starts (updates,
    # not rollout steps: a step makes train.ppo_epochs x train.minibatches updates, so the switch must be a
    # multiple of that). The second stage's learning rate, schedule and KL reference: the `stage2` section.
    stage_switch_step: int = 0

    # --- CHORD's SFT weight mu (arXiv 2508.11408): loss = (1 - mu) * L_GRPO + mu * L_SFT ---
    # Value of mu at step 0 (CHORD starts high so the expert data dominates early).
    mu_start: float = 0.9
    # Value of mu once the schedule has run out.
    mu_end: float = 0.05
    # "constant" (mu_start throughout), "linear" or "cosine" decay from mu_start to mu_end.
    mu_schedule: str = "cosine"
    # Number of optimizer updates over which mu goes from mu_start to mu_end (ignored by "constant").
    mu_decay_steps: int = 100
    # Token weighting inside the SFT term: "none" (plain NLL) or "chord_phi" (CHORD-phi: each token's
    # NLL times p * (1 - p) of the policy, which damps tokens the policy is already sure of or far from).
    sft_token_weighting: str = "none"

    # --- aggregation (one mode for every term, always normalised by the step's global counts) ---
    # "token-mean": sum over all trained tokens / their global count (DAPO's token-level loss).
    # "seq-mean-token-mean": mean over each sequence's tokens, then over global sequences (original GRPO).
    # "seq-mean-token-sum-norm": each sequence's token sum / agg_norm_length, then mean over global
    # sequences (Dr.GRPO, arXiv 2503.20783: a constant instead of the length removes the length bias).
    loss_agg_mode: str = "token-mean"
    # The constant of "seq-mean-token-sum-norm" (usually the maximum response length); required there.
    agg_norm_length: int | None = None

    # --- clipped policy gradient (PPO / GRPO, with DAPO's decoupled clip) ---
    # Lower clip: the ratio is clipped at 1 - clip_eps_low (PPO's epsilon, 0.2).
    clip_eps_low: float = 0.2
    # Upper clip: the ratio is clipped at 1 + clip_eps_high (DAPO's "clip-higher" uses 0.28).
    clip_eps_high: float = 0.2
    # Dual-clip constant c > 1 (Ye et al. 2020, "Mastering complex control in MOBA games"): for
    # negative advantages the per-token loss is capped at c * |A|. None switches it off.
    dual_clip_c: float | None = None
    # Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
    # off-policy RL training"): multiply each token's policy-gradient loss by
    # min(pi_old / pi_engine, tis_cap), correcting the mismatch between the trainer's and the rollout
    # engine's log-probs. None switches it off; needs engine log-probs in the loss inputs.
    tis_cap: float | None = None

    # --- regularisers on rollout tokens ---
    # Coefficient of the KL penalty to the frozen reference model (GRPO, arXiv 2402.03300); 0 = off.
    kl_coef: float = 0.0
    # KL estimator (Schulman 2020, "Approximating KL divergence"): "k1" = log(pi/ref),
    # "k2" = 0.5 * log(pi/ref)^2, "k3" = ref/pi - 1 - log(ref/pi) (GRPO's choice, unbiased and >= 0;
    # capped at losses.MAX_K3 = 10 per token, as verl does, so a far-off token adds no runaway term).
    kl_estimator: str = "k3"
    # Entropy bonus coefficient: the loss gets -entropy_coef * entropy; 0 = off. Needs per-token entropy.
    entropy_coef: float = 0.0

    # --- advantages (advantages.py), for the task reward and the discriminator scores alike ---
    # "std": (r - mean) / (std + eps) per group (GRPO). "mean": r - mean only (Dr.GRPO).
    adv_norm: str = "std"
    # Leave-one-out baseline (RLOO, Ahmadian et al. 2024): each sample's baseline is the mean of the
    # other G - 1 samples of its group.
    adv_leave_one_out: bool = False
    # Added to the group's std before dividing, so equal rewards give 0 and not NaN.
    adv_eps: float = 1e-6

    def __post_init__(self) -> None:
        validate(self)


def _fail(field: str, expected: str, value: object) -> None:
    raise ObjectiveConfigError(f"objective.{field}: expected {expected}, got {value!r}")


def _check_choice(cfg: ObjectiveConfig, field: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, field)
    if value not in choices:
        _fail(field, "one of " + ", ".join(repr(c) for c in choices), value)


def _check_number(cfg: ObjectiveConfig, field: str, lo: float, hi: float, *, lo_open: bool = False) -> None:
    value = getattr(cfg, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        _fail(field, f"a number in {bracket}{lo}, {hi}]", value)


def validate(cfg: ObjectiveConfig) -> None:
    """Raise ObjectiveConfigError naming the first bad field."""
    _check_choice(cfg, "algorithm", ALGORITHMS)
    _check_choice(cfg, "adversarial_mode", ADVERSARIAL_MODES)
    _check_choice(cfg, "mu_schedule", SCHEDULES)
    _check_choice(cfg, "sft_token_weighting", SFT_TOKEN_WEIGHTINGS)
    _check_choice(cfg, "loss_agg_mode", AGG_MODES)
    _check_choice(cfg, "kl_estimator", KL_ESTIMATORS)
    _check_choice(cfg, "adv_norm", ADV_NORMS)
    for name in ("w_sft", "w_rl", "lambda_adv", "kl_coef", "entropy_coef"):
        _check_number(cfg, name, 0.0, math.inf)
    for name in ("mu_start", "mu_end"):
        _check_number(cfg, name, 0.0, 1.0)
    _check_number(cfg, "clip_eps_low", 0.0, 1.0)
    if cfg.clip_eps_low >= 1.0:
        _fail("clip_eps_low", "a number below 1 (the ratio's lower bound 1 - eps must stay positive)", 1.0)
    _check_number(cfg, "clip_eps_high", 0.0, math.inf)
    _check_number(cfg, "adv_eps", 0.0, math.inf)
    for name in ("stage_switch_step", "mu_decay_steps"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            _fail(name, "an integer >= 0", value)
    if cfg.mu_schedule != "constant" and cfg.algorithm in ("chord", "a_chord") and cfg.mu_decay_steps == 0:
        _fail("mu_decay_steps", f"an integer >= 1 for the {cfg.mu_schedule!r} schedule", 0)
    if "->" in cfg.algorithm and cfg.stage_switch_step == 0:
        _fail("stage_switch_step", f"an integer >= 1 for the staged algorithm {cfg.algorithm!r}", 0)
    if cfg.dual_clip_c is not None:
        _check_number(cfg, "dual_clip_c", 1.0, math.inf, lo_open=True)
    if cfg.tis_cap is not None:
        _check_number(cfg, "tis_cap", 0.0, math.inf, lo_open=True)
    if not isinstance(cfg.adv_leave_one_out, bool):
        _fail("adv_leave_one_out", "true or false", cfg.adv_leave_one_out)
    if cfg.loss_agg_mode == "seq-mean-token-sum-norm":
        n = cfg.agg_norm_length
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            _fail("agg_norm_length", "an integer >= 1 (needed by loss_agg_mode 'seq-mean-token-sum-norm')", n)
    elif cfg.agg_norm_length is not None:
        n = cfg.agg_norm_length
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            _fail("agg_norm_length", "an integer >= 1 or null", n)
