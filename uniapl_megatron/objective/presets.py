"""Algorithm presets: each named algorithm is a setting of the one UniAPL step.

For an optimizer step, :func:`resolve_weights` gives the weights of the three terms

    loss = w_sft * L_SFT(demos) + w_rl * L_PG(rollouts, A_task) + lambda_adv * L_PG(rollouts, A_adv)

(plus the KL and entropy regularisers on rollout tokens, whose coefficients are absolute and
apply whenever rollouts are trained). Single-stage algorithms:

=========  =========  ===========  ==========  ==========================================
name       w_sft      w_rl         lambda_adv  what it is
=========  =========  ===========  ==========  ==========================================
sft        w_sft      0            0           teacher demonstrations only
a_sft      w_sft      0            lambda_adv  SFT + adversarial term on rollouts, no task reward
grpo       0          w_rl         0           verifiable reward only
a_grpo     0          w_rl         lambda_adv  GRPO + adversarial term
chord      mu(t)      1 - mu(t)    0           CHORD-mu: SFT weight on a decaying schedule
a_chord    mu(t)      1 - mu(t)    lambda_adv  CHORD + adversarial term
uniapl     w_sft      w_rl         lambda_adv  all three terms in every step
=========  =========  ===========  ==========  ==========================================

Staged algorithms ``x->y`` (``sft->grpo``, ``sft->a_grpo``, ``a_sft->a_grpo``) run ``x`` for the
optimizer updates ``[0, stage_switch_step)`` and ``y`` from ``stage_switch_step`` on. Every step number
here (the switch, CHORD's mu schedule) counts optimizer updates, not rollout steps: a rollout step with
``train.ppo_epochs * train.minibatches`` updates advances it by that many.

What ``a_sft`` means. The "a_" prefix always adds the same thing: the adversarial
policy-gradient term on the student's own rollouts, with discriminator scores as the signal.
For SFT that is the only place the discriminator can act: on the teacher's own answers a
reference-conditioned discriminator compares the answer with itself, so its score is a
constant that carries no gradient signal, and weighting demonstrations by it would be a no-op
(an online discriminator would call every demonstration "real" for the same reason). So
``a_sft`` = SFT on demonstrations + lambda_adv * L_adv on rollouts, and the verifiable task
reward is not used (no verifier is needed): it is SFT with a GAIL-like adversarial signal.
Nothing adversarial is applied to demonstrations in any preset.

The reward ablation (``adversarial_mode="reward"``): the scores, times lambda_adv, are added to
the task reward before group normalisation and the separate term is off. For ``a_sft`` (no task
reward to add to) the rollout reward is the score alone and its policy-gradient term gets weight
lambda_adv, which makes both modes the same objective there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from uniapl_megatron.objective.config import ObjectiveConfig


@dataclass(frozen=True)
class StepWeights:
    """What the step trains with, as resolved for one optimizer step."""

    stage: str  # the single-stage algorithm in force (e.g. "sft" during the first stage of "sft->grpo")
    w_sft: float  # weight of the SFT NLL on demonstrations
    w_rl: float  # weight of the policy-gradient term on rollouts driven by the task advantages
    lambda_adv: float  # weight of the separate adversarial policy-gradient term (0 in reward mode)
    adv_reward_coef: float  # reward mode: rollout reward += adv_reward_coef * score (0 in loss mode)
    use_task_reward: bool  # whether the verifiable reward enters the rollout reward

    @property
    def needs_demos(self) -> bool:
        return self.w_sft > 0

    @property
    def needs_rollouts(self) -> bool:
        return self.w_rl > 0 or self.lambda_adv > 0

    @property
    def needs_discriminator(self) -> bool:
        return self.lambda_adv > 0 or self.adv_reward_coef > 0


def mu_at(cfg: ObjectiveConfig, step: int) -> float:
    """CHORD's SFT weight mu at an optimizer step."""
    if cfg.mu_schedule == "constant":
        return cfg.mu_start
    progress = min(max(step, 0) / cfg.mu_decay_steps, 1.0)
    if cfg.mu_schedule == "linear":
        return cfg.mu_start + (cfg.mu_end - cfg.mu_start) * progress
    # cosine: starts flat at mu_start, ends flat at mu_end
    return cfg.mu_end + (cfg.mu_start - cfg.mu_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def stage_at(cfg: ObjectiveConfig, step: int) -> str:
    """The single-stage algorithm in force at a step."""
    if "->" not in cfg.algorithm:
        return cfg.algorithm
    first, second = cfg.algorithm.split("->")
    return first if step < cfg.stage_switch_step else second


@dataclass(frozen=True)
class RunNeeds:
    """What a whole run of a preset needs, at any of its optimizer updates."""

    demos: bool
    rollouts: bool
    discriminator: bool
    stages: tuple[str, ...]


def run_needs(cfg: ObjectiveConfig, total_updates: int) -> RunNeeds:
    """The union of the needs of updates 0 .. total_updates - 1.

    The weights are piecewise monotone in the step (a stage switch; CHORD's mu decays monotonically), so
    the first and last update of each stage cover every value they take.
    """
    last = max(total_updates, 1) - 1
    points = {0, last}
    if "->" in cfg.algorithm:
        points |= {min(cfg.stage_switch_step - 1, last), min(cfg.stage_switch_step, last)}
    ws = [resolve_weights(cfg, p) for p in sorted(points)]
    stages = tuple(dict.fromkeys(w.stage for w in ws))
    return RunNeeds(
        any(w.needs_demos for w in ws),
        any(w.needs_rollouts for w in ws),
        any(w.needs_discriminator for w in ws),
        stages,
    )


def resolve_weights(cfg: ObjectiveConfig, step: int) -> StepWeights:
    """The weights of every term at optimizer update ``step`` (0-based), as documented above."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"resolve_weights: step must be an integer >= 0, got {step!r}")
    stage = stage_at(cfg, step)
    adversarial = stage.startswith("a_")
    base = stage[2:] if adversarial else stage
    if base == "sft":
        w_sft, w_rl = cfg.w_sft, 0.0
    elif base == "grpo":
        w_sft, w_rl = 0.0, cfg.w_rl
    elif base == "chord":
        mu = mu_at(cfg, step)
        w_sft, w_rl = mu, 1.0 - mu
    elif base == "uniapl":
        w_sft, w_rl = cfg.w_sft, cfg.w_rl
        adversarial = True
    else:  # validated in config; reaching here is a bug
        raise AssertionError(f"unknown stage {stage!r}")
    lam = cfg.lambda_adv if adversarial else 0.0
    use_task_reward = w_rl > 0
    if cfg.adversarial_mode == "reward" and lam > 0:
        if use_task_reward:
            return StepWeights(stage, w_sft, w_rl, 0.0, lam, True)
        # No task reward (a_sft): the score is the whole reward, its term keeps the weight lambda.
        return StepWeights(stage, w_sft, lam, 0.0, 1.0, False)
    return StepWeights(stage, w_sft, w_rl, lam, 0.0, use_task_reward)
