"""Presets resolve to the documented weights; bad config values name their field."""

from __future__ import annotations

import math

import pytest
import torch

from uniapl_megatron.objective import (
    LossInputs,
    ObjectiveConfig,
    ObjectiveConfigError,
    mu_at,
    objective_loss,
    resolve_weights,
    rollout_advantages,
    step_counts,
)

BASE = dict(w_sft=0.6, w_rl=0.9, lambda_adv=0.2)


def _w(algorithm: str, step: int = 0, **kw):
    w = resolve_weights(ObjectiveConfig(algorithm=algorithm, **{**BASE, **kw}), step)
    return (w.w_sft, w.w_rl, w.lambda_adv, w.adv_reward_coef, w.use_task_reward)


@pytest.mark.parametrize(
    "algorithm, expected",
    [
        ("sft", (0.6, 0.0, 0.0, 0.0, False)),
        ("a_sft", (0.6, 0.0, 0.2, 0.0, False)),
        ("grpo", (0.0, 0.9, 0.0, 0.0, True)),
        ("a_grpo", (0.0, 0.9, 0.2, 0.0, True)),
        ("uniapl", (0.6, 0.9, 0.2, 0.0, True)),
    ],
)
def test_single_stage_presets(algorithm, expected):
    assert _w(algorithm) == expected
    assert _w(algorithm, step=1000) == expected  # constant over time


def test_needs_flags():
    w = resolve_weights(ObjectiveConfig(algorithm="sft"), 0)
    assert (w.needs_demos, w.needs_rollouts, w.needs_discriminator) == (True, False, False)
    w = resolve_weights(ObjectiveConfig(algorithm="a_sft"), 0)
    assert (w.needs_demos, w.needs_rollouts, w.needs_discriminator) == (True, True, True)
    w = resolve_weights(ObjectiveConfig(algorithm="grpo"), 0)
    assert (w.needs_demos, w.needs_rollouts, w.needs_discriminator) == (False, True, False)


@pytest.mark.parametrize(
    "algorithm, before, after",
    [
        ("sft->grpo", (0.6, 0.0, 0.0, 0.0, False), (0.0, 0.9, 0.0, 0.0, True)),
        ("sft->a_grpo", (0.6, 0.0, 0.0, 0.0, False), (0.0, 0.9, 0.2, 0.0, True)),
        ("a_sft->a_grpo", (0.6, 0.0, 0.2, 0.0, False), (0.0, 0.9, 0.2, 0.0, True)),
    ],
)
def test_staged_presets_switch_at_the_configured_step(algorithm, before, after):
    assert _w(algorithm, 0, stage_switch_step=5) == before
    assert _w(algorithm, 4, stage_switch_step=5) == before
    assert _w(algorithm, 5, stage_switch_step=5) == after
    assert (
        resolve_weights(ObjectiveConfig(algorithm=algorithm, stage_switch_step=5), 5).stage == algorithm.split("->")[1]
    )


def test_chord_mu_schedules():
    lin = ObjectiveConfig(algorithm="chord", mu_start=0.9, mu_end=0.1, mu_schedule="linear", mu_decay_steps=10)
    assert [round(mu_at(lin, s), 6) for s in (0, 5, 10, 50)] == [0.9, 0.5, 0.1, 0.1]
    cos = ObjectiveConfig(algorithm="chord", mu_start=0.9, mu_end=0.1, mu_schedule="cosine", mu_decay_steps=10)
    assert mu_at(cos, 0) == pytest.approx(0.9)
    assert mu_at(cos, 5) == pytest.approx(0.5)
    assert mu_at(cos, 2) == pytest.approx(0.1 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert mu_at(cos, 10) == pytest.approx(0.1) and mu_at(cos, 99) == pytest.approx(0.1)
    const = ObjectiveConfig(algorithm="chord", mu_start=0.3, mu_schedule="constant")
    assert mu_at(const, 77) == 0.3


def test_chord_and_a_chord_weights_follow_mu():
    kw = dict(mu_start=0.8, mu_end=0.2, mu_schedule="linear", mu_decay_steps=4)
    assert _w("chord", 2, **kw) == pytest.approx((0.5, 0.5, 0.0, 0.0, True))
    assert _w("a_chord", 4, **kw) == pytest.approx((0.2, 0.8, 0.2, 0.0, True))


def test_reward_ablation_moves_lambda_into_the_reward():
    assert _w("a_grpo", adversarial_mode="reward") == (0.0, 0.9, 0.0, 0.2, True)
    assert _w("uniapl", adversarial_mode="reward") == (0.6, 0.9, 0.0, 0.2, True)
    # a_sft has no task reward: the score is the reward and its term keeps weight lambda
    assert _w("a_sft", adversarial_mode="reward") == (0.6, 0.2, 0.0, 1.0, False)


def test_a_sft_reward_mode_is_the_same_objective_as_loss_mode():
    logp = torch.tensor([-1.0, -0.5, -0.7, -0.2, -0.9, -1.1], requires_grad=True)
    inp = dict(
        loss_mask=torch.tensor([1, 1, 0, 1, 1, 1]),
        seq_ids=torch.tensor([0, 0, 1, 1, 2, 2]),
        is_demo=torch.tensor([True, False, False]),
        old_logprobs=torch.tensor([-1.0, -0.4, -0.7, -0.5, -0.9, -0.8]),
    )
    scores = torch.tensor([0.3, 1.1])  # discriminator scores of the two rollouts (one group)
    losses = []
    for mode in ("loss", "reward"):
        cfg = ObjectiveConfig(algorithm="a_sft", lambda_adv=0.4, adversarial_mode=mode)
        w = resolve_weights(cfg, 0)
        adv = rollout_advantages(torch.tensor([0, 0]), w, cfg, scores=scores)
        zero = torch.zeros(1)
        batch = LossInputs(
            logprobs=logp,
            advantages=torch.cat([zero, adv.task]),
            adv_advantages=torch.cat([zero, adv.adversarial]),
            **inp,
        )
        loss, m = objective_loss(batch, w, cfg, step_counts([batch]))
        assert ("loss/adv" in m) == (mode == "loss")
        losses.append(loss.item())
    assert abs(losses[0]) > 1e-3
    assert losses[0] == pytest.approx(losses[1], abs=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(algorithm="ppo"), "objective.algorithm: expected one of 'sft', 'a_sft'"),
        (dict(lambda_adv=-0.1), "objective.lambda_adv: expected a number >= 0.0 (finite), got -0.1"),
        (dict(w_sft=float("nan")), "objective.w_sft"),
        (dict(clip_eps_low=1.0), "objective.clip_eps_low: expected a number in [0.0, 1.0) (the ratio"),
        (dict(clip_eps_high="0.2"), "objective.clip_eps_high"),
        (dict(dual_clip_c=1.0), "objective.dual_clip_c: expected a number > 1.0 (finite) or null, got 1.0"),
        (dict(tis_cap=0), "objective.tis_cap"),
        (dict(kl_estimator="k4"), "objective.kl_estimator: expected one of 'k1', 'k2', 'k3'"),
        (dict(loss_agg_mode="seq-mean-token-sum-norm"), "objective.agg_norm_length: expected an integer >= 1"),
        (dict(loss_agg_mode="sum"), "objective.loss_agg_mode"),
        (dict(adv_norm="none"), "objective.adv_norm"),
        (dict(algorithm="sft->grpo"), "objective.stage_switch_step: expected an integer >= 1 for the staged"),
        (dict(algorithm="chord", mu_decay_steps=0), "objective.mu_decay_steps: expected an integer >= 1"),
        (dict(mu_start=1.5), "objective.mu_start: expected a number in [0.0, 1.0]"),
        (dict(adversarial_mode="both"), "objective.adversarial_mode"),
        (dict(adv_leave_one_out="yes"), "objective.adv_leave_one_out: expected true or false"),
        (dict(stage_switch_step=-1), "objective.stage_switch_step: expected an integer >= 0"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, message):
    with pytest.raises(ObjectiveConfigError) as err:
        ObjectiveConfig(**kwargs)
    assert message in str(err.value)


def test_bad_step_is_reported():
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        resolve_weights(ObjectiveConfig(), -1)
