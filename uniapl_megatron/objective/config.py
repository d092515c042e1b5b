"""The objective's configuration: one dataclass, validated when built.

Every field says what it does and where the idea comes from. The algorithm preset
(``algorithm``) decides which terms are on at a given step (see ``presets.py``); the other
fields shape the terms themselves (``losses.py``) and the advantages (``advantages.py``).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Literal

from ..config_fields import FINITE, Ge, Gt, Interval, check_fields

Algorithm = Literal[
    "sft", "a_sft", "grpo", "a_grpo", "sft->grpo", "sft->a_grpo", "a_sft->a_grpo", "chord", "a_chord", "uniapl"
]
ALGORITHMS: tuple[str, ...] = typing.get_args(Algorithm)
"""The presets, in the paper's table order."""

Weight = Annotated[float, Ge(0.0), FINITE]
"""A non-negative, finite coefficient."""
Fraction = Annotated[float, Interval(ge=0.0, le=1.0), FINITE]


class ObjectiveConfigError(ValueError):
    """A bad value in the objective's configuration; the message names the field."""


@dataclass
class ObjectiveConfig:
    # --- which algorithm (presets.py turns it into per-step weights) ---
    algorithm: Algorithm = "uniapl"
    """`uniapl` (arXiv 2509.25148) mixes SFT, GRPO and the adversarial term in every step; the others are the
    paper's baselines. `x->y` presets run x until `stage_switch_step`, then y."""
    w_sft: Weight = 1.0
    """Weight of the SFT NLL on teacher demonstrations (UniAPL's SFT:RL balance; unknown in the paper)."""
    w_rl: Weight = 1.0
    """Weight of the GRPO policy-gradient term driven by the verifiable task reward."""
    lambda_adv: Weight = 0.1
    """Weight of the adversarial term (discriminator scores -> group advantages -> its own clipped
    policy-gradient loss). UniAPL: a separate term works better than adding scores to the reward,
    and too large a value hurts."""
    adversarial_mode: Literal["loss", "reward"] = "loss"
    """"loss": the adversarial signal is its own term (UniAPL). "reward": ablation, the scores times
    lambda_adv are added to the task reward before the group normalisation, and no separate term."""
    stage_switch_step: Annotated[int, Ge(0)] = 0
    """Staged presets (`sft->grpo`, ...): the optimizer update at which the second stage starts (updates,
    not rollout steps: a step makes train.ppo_epochs x train.minibatches updates, so the switch must be a
    multiple of that). The second stage's learning rate, schedule and KL reference: the `stage2` section."""

    # --- CHORD's SFT weight mu (arXiv 2508.11408): loss = (1 - mu) * L_GRPO + mu * L_SFT ---
    mu_start: Fraction = 0.9
    """Value of mu at step 0 (CHORD starts high so the expert data dominates early)."""
    mu_end: Fraction = 0.05
    """Value of mu once the schedule has run out."""
    mu_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """"constant" (mu_start throughout), "linear" or "cosine" decay from mu_start to mu_end."""
    mu_decay_steps: Annotated[int, Ge(0)] = 100
    """Number of optimizer updates over which mu goes from mu_start to mu_end (ignored by "constant")."""
    sft_token_weighting: Literal["none", "chord_phi"] = "none"
    """Token weighting inside the SFT term: "none" (plain NLL) or "chord_phi" (CHORD-phi: each token's
    NLL times p * (1 - p) of the policy, which damps tokens the policy is already sure of or far from)."""

    # --- aggregation (one mode for every term, always normalised by the step's global counts) ---
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """"token-mean": sum over all trained tokens / their global count (DAPO's token-level loss).
    "seq-mean-token-mean": mean over each sequence's tokens, then over global sequences (original GRPO).
    "seq-mean-token-sum-norm": each sequence's token sum / agg_norm_length, then mean over global
    sequences (Dr.GRPO, arXiv 2503.20783: a constant instead of the length removes the length bias)."""
    agg_norm_length: Annotated[int, Ge(1)] | None = None
    """The constant of "seq-mean-token-sum-norm" (usually the maximum response length); required there."""

    # --- clipped policy gradient (PPO / GRPO, with DAPO's decoupled clip) ---
    clip_eps_low: Annotated[
        float,
        Interval(ge=0.0, lt=1.0),
        FINITE,
        "a number in [0.0, 1.0) (the ratio's lower bound 1 - eps must stay positive)",
    ] = 0.2
    """Lower clip: the ratio is clipped at 1 - clip_eps_low (PPO's epsilon, 0.2)."""
    clip_eps_high: Weight = 0.2
    """Upper clip: the ratio is clipped at 1 + clip_eps_high (DAPO's "clip-higher" uses 0.28)."""
    dual_clip_c: Annotated[float, Gt(1.0), FINITE] | None = None
    """Dual-clip constant c > 1 (Ye et al. 2020, "Mastering complex control in MOBA games"): for
    negative advantages the per-token loss is capped at c * |A|. None switches it off."""
    tis_cap: Annotated[float, Gt(0.0), FINITE] | None = None
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): multiply each token's policy-gradient loss by
    min(pi_old / pi_engine, tis_cap), correcting the mismatch between the trainer's and the rollout
    engine's log-probs. None switches it off; needs engine log-probs in the loss inputs."""

    # --- regularisers on rollout tokens ---
    kl_coef: Weight = 0.0
    """Coefficient of the KL penalty to the frozen reference model (GRPO, arXiv 2402.03300); 0 = off."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator (Schulman 2020, "Approximating KL divergence"): "k1" = log(pi/ref),
    "k2" = 0.5 * log(pi/ref)^2, "k3" = ref/pi - 1 - log(ref/pi) (GRPO's choice, unbiased and >= 0;
    capped at losses.MAX_K3 = 10 per token, as verl does, so a far-off token adds no runaway term)."""
    entropy_coef: Weight = 0.0
    """Entropy bonus coefficient: the loss gets -entropy_coef * entropy; 0 = off. Needs per-token entropy."""

    # --- advantages (advantages.py), for the task reward and the discriminator scores alike ---
    adv_norm: Literal["std", "mean"] = "std"
    """"std": (r - mean) / (std + eps) per group (GRPO). "mean": r - mean only (Dr.GRPO)."""
    adv_leave_one_out: bool = False
    """Leave-one-out baseline (RLOO, Ahmadian et al. 2024): each sample's baseline is the mean of the
    other G - 1 samples of its group."""
    adv_eps: Weight = 1e-6
    """Added to the group's std before dividing, so equal rewards give 0 and not NaN."""

    def __post_init__(self) -> None:
        check_fields(self, "objective", ObjectiveConfigError)
        if self.mu_schedule != "constant" and self.algorithm in ("chord", "a_chord") and self.mu_decay_steps == 0:
            raise ObjectiveConfigError(
                f"objective.mu_decay_steps: expected an integer >= 1 for the {self.mu_schedule!r} schedule of "
                f"{self.algorithm!r}, got 0: set the updates over which mu decays, or mu_schedule: constant"
            )
        if "->" in self.algorithm and self.stage_switch_step == 0:
            raise ObjectiveConfigError(
                f"objective.stage_switch_step: expected an integer >= 1 for the staged algorithm "
                f"{self.algorithm!r}, got 0: set the optimizer update at which the second stage starts"
            )
        if self.loss_agg_mode == "seq-mean-token-sum-norm" and self.agg_norm_length is None:
            raise ObjectiveConfigError(
                "objective.agg_norm_length: expected an integer >= 1 (needed by loss_agg_mode "
                "'seq-mean-token-sum-norm'), got None: set it to the longest response, in tokens"
            )
