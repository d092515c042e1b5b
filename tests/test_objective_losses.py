"""Each loss term against numbers worked out by hand, and the aggregation modes' normalisers."""

from __future__ import annotations

import math

import pytest
import torch

from uniapl_megatron.objective import (
    GlobalCounts,
    LossInputs,
    ObjectiveConfig,
    StepWeights,
    objective_loss,
    seq_ids_from_cu_seqlens,
    step_counts,
)

LN = math.log

# One packed micro-batch: a prompt token (untrained), rollout 0 (3 tokens, A=+1), rollout 1
# (2 tokens, A=-1), then one padding token. Ratios pi/pi_old are chosen per token.
RATIOS = [1.0, 1.5, 0.9, 1.1, 0.5, 1.3, 1.0]
MASK = [0, 1, 1, 1, 1, 1, 0]
SEQ = [0, 0, 0, 0, 1, 1, -1]


def _rollout_batch(ratios=RATIOS, adv=(1.0, -1.0), **extra) -> LossInputs:
    old = torch.tensor([-1.0, -0.7, -1.2, -0.4, -2.0, -0.3, -5.0])
    logp = (old + torch.tensor([LN(r) for r in ratios])).requires_grad_(True)
    return LossInputs(
        logprobs=logp,
        loss_mask=torch.tensor(MASK),
        seq_ids=torch.tensor(SEQ),
        is_demo=torch.tensor([False, False]),
        advantages=torch.tensor(adv),
        old_logprobs=old,
        **extra,
    )


def _grpo(**cfg) -> tuple[ObjectiveConfig, StepWeights]:
    cfg = ObjectiveConfig(algorithm="grpo", clip_eps_low=0.2, clip_eps_high=0.28, **cfg)
    return cfg, StepWeights("grpo", 0.0, 1.0, 0.0, 0.0, True)


def test_grpo_clipped_loss_token_mean_matches_hand_value_and_gradient():
    cfg, w = _grpo()
    inp = _rollout_batch()
    loss, m = objective_loss(inp, w, cfg, step_counts([inp]))
    # A=+1: -min(r, clip(r)) -> r=1.5 clips at 1.28; A=-1: max(r, clip(r)) -> r=0.5 clips at 0.8.
    expected = (-1.28 - 0.9 - 1.1 + 0.8 + 1.3) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["pg/clip_frac"].item() == pytest.approx(2 / 5)
    assert m["ratio/mean"].item() == pytest.approx((1.5 + 0.9 + 1.1 + 0.5 + 1.3) / 5, abs=1e-6)
    loss.backward()
    # d/dlogp of -A*r is -A*r where unclipped, 0 where the clipped branch is active.
    want = torch.tensor([0.0, 0.0, -0.9 / 5, -1.1 / 5, 0.0, 1.3 / 5, 0.0])
    torch.testing.assert_close(inp.logprobs.grad, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "mode, norm_length, expected",
    [
        ("seq-mean-token-mean", None, ((-1.28 - 0.9 - 1.1) / 3 + (0.8 + 1.3) / 2) / 2),
        ("seq-mean-token-sum-norm", 4, ((-1.28 - 0.9 - 1.1) / 4 + (0.8 + 1.3) / 4) / 2),
    ],
)
def test_sequence_level_aggregations_match_hand_values(mode, norm_length, expected):
    cfg, w = _grpo(loss_agg_mode=mode, agg_norm_length=norm_length)
    inp = _rollout_batch()
    loss, _ = objective_loss(inp, w, cfg, step_counts([inp]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_dual_clip_caps_negative_advantage_loss():
    cfg, w = _grpo(dual_clip_c=3.0)
    inp = _rollout_batch(ratios=[1.0, 1.0, 1.0, 1.0, 5.0, 2.0, 1.0], adv=(0.5, -2.0))
    loss, m = objective_loss(inp, w, cfg, step_counts([inp]))
    # A=+0.5 tokens at r=1: -0.5 each. A=-2: r=5 -> max(10, 2.56)=10 capped at 3*2=6; r=2 -> 4 < 6.
    expected = (-0.5 * 3 + 6.0 + 4.0) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["pg/dual_clip_frac"].item() == pytest.approx(1 / 5)
    loss.backward()
    assert inp.logprobs.grad[4].item() == 0.0  # the capped token gets no gradient
    assert inp.logprobs.grad[5].item() == pytest.approx(2.0 * 2.0 / 5, abs=1e-6)


def test_truncated_importance_sampling_weights_the_tokens():
    cfg, w = _grpo(tis_cap=2.0)
    # engine log-probs such that pi_old / pi_engine = [_, 3, 1, 0.5, 1, 1.5, _]
    inp = _rollout_batch()
    is_ratio = [1.0, 3.0, 1.0, 0.5, 1.0, 1.5, 1.0]
    inp.engine_logprobs = inp.old_logprobs - torch.tensor([LN(x) for x in is_ratio])
    loss, m = objective_loss(inp, w, cfg, step_counts([inp]))
    expected = (-1.28 * 2.0 - 0.9 * 1.0 - 1.1 * 0.5 + 0.8 * 1.0 + 1.3 * 1.5) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["tis/capped_frac"].item() == pytest.approx(1 / 5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_hand_values(estimator):
    d = [0.1, -0.2, 0.3, 0.4, -0.5]  # log(pi / ref) of the five trained tokens
    by_hand = {"k1": d, "k2": [0.5 * x * x for x in d], "k3": [math.exp(-x) - 1 + x for x in d]}[estimator]
    cfg = ObjectiveConfig(algorithm="grpo", kl_coef=0.25, kl_estimator=estimator)
    w = StepWeights("grpo", 0.0, 1.0, 0.0, 0.0, True)
    inp = _rollout_batch(ratios=[1.0] * 7, adv=(0.0, 0.0))  # policy-gradient part is exactly 0
    inp.ref_logprobs = inp.logprobs.detach() - torch.tensor([0.0, *d, 9.0])
    loss, m = objective_loss(inp, w, cfg, step_counts([inp]))
    assert m["kl"].item() == pytest.approx(sum(by_hand) / 5, abs=1e-6)
    assert loss.item() == pytest.approx(0.25 * sum(by_hand) / 5, abs=1e-6)


def test_k3_is_capped_and_its_gradient_never_points_away_from_the_reference():
    from uniapl_megatron.objective.losses import MAX_K3, kl_per_token

    # log(pi / ref) from far below to far above the reference; the exp input alone used to be clamped at 20,
    # which left exp(20) - 1 + d (about 4.9e8) with gradient +1 for d < -20: minimising it lowered pi further.
    d = torch.tensor([-200.0, -50.0, -21.0, -19.0, -5.0, -2.0, -0.5, 0.0, 0.5, 2.0, 12.0, 50.0, 200.0])
    logp = d.clone().requires_grad_(True)
    k3 = kl_per_token(logp, torch.zeros_like(d), "k3")
    k3.sum().backward()
    exact = torch.exp(-d.double()) - 1 + d.double()
    assert torch.isfinite(k3).all() and torch.isfinite(logp.grad).all()
    assert ((k3 >= 0) & (k3 <= MAX_K3)).all(), k3
    small = exact <= MAX_K3
    assert torch.allclose(k3[small].double(), exact[small], rtol=1e-5, atol=1e-6)
    assert (k3[~small] == MAX_K3).all()
    # d(k3)/d(log pi) = 1 - ref/pi: negative below the reference (raise pi), positive above; never the
    # opposite sign, and the exact value wherever the term is not capped.
    assert (logp.grad[d < 0] <= 0).all() and (logp.grad[d > 0] >= 0).all(), logp.grad
    assert torch.allclose(logp.grad[small].double(), (1 - torch.exp(-d.double()))[small], rtol=1e-5, atol=1e-6)
    assert (logp.grad[~small] == 0).all()
    # Through the whole objective: a far-off token cannot dominate the step's KL.
    cfg = ObjectiveConfig(algorithm="grpo", kl_coef=1.0, kl_estimator="k3")
    inp = _rollout_batch(ratios=[1.0] * 7, adv=(0.0, 0.0))
    inp.ref_logprobs = inp.logprobs.detach() + torch.tensor([0.0, 60.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    loss, m = objective_loss(inp, StepWeights("grpo", 0.0, 1.0, 0.0, 0.0, True), cfg, step_counts([inp]))
    assert m["kl"].item() == pytest.approx(MAX_K3 / 5, abs=1e-6)
    loss.backward()
    assert torch.isfinite(inp.logprobs.grad).all() and inp.logprobs.grad[1].item() <= 0


def test_entropy_bonus_lowers_the_loss_by_coef_times_mean_entropy():
    cfg = ObjectiveConfig(algorithm="grpo", entropy_coef=0.1)
    w = StepWeights("grpo", 0.0, 1.0, 0.0, 0.0, True)
    inp = _rollout_batch(ratios=[1.0] * 7, adv=(0.0, 0.0))
    inp.entropy = torch.tensor([9.0, 0.5, 1.0, 1.5, 2.0, 3.0, 9.0])
    loss, m = objective_loss(inp, w, cfg, step_counts([inp]))
    assert m["entropy"].item() == pytest.approx(8.0 / 5)
    assert loss.item() == pytest.approx(-0.1 * 8.0 / 5, abs=1e-7)


def _demo_and_rollout_batch() -> LossInputs:
    # seq 0: demo, trained tokens with log-probs -0.5, -1.0, -2.0; seq 1: rollout, 2 tokens, r = 1.
    logp = torch.tensor([-3.0, -0.5, -1.0, -2.0, -0.2, -0.6], requires_grad=True)
    return LossInputs(
        logprobs=logp,
        loss_mask=torch.tensor([0, 1, 1, 1, 1, 1]),
        seq_ids=torch.tensor([0, 0, 0, 0, 1, 1]),
        is_demo=torch.tensor([True, False]),
        advantages=torch.tensor([0.0, 0.8]),
        adv_advantages=torch.tensor([0.0, -0.4]),
    )


def test_sft_nll_and_chord_phi_weighting():
    w = StepWeights("sft", 1.0, 0.0, 0.0, 0.0, False)
    inp = _demo_and_rollout_batch()
    loss, m = objective_loss(inp, w, ObjectiveConfig(algorithm="sft"), step_counts([inp]))
    assert loss.item() == pytest.approx((0.5 + 1.0 + 2.0) / 3, abs=1e-6)
    assert m["sft/nll"].item() == pytest.approx(3.5 / 3, abs=1e-6)
    cfg = ObjectiveConfig(algorithm="sft", sft_token_weighting="chord_phi")
    loss, _ = objective_loss(_demo_and_rollout_batch(), w, cfg, step_counts([inp]))
    phi = [math.exp(-x) * (1 - math.exp(-x)) for x in (0.5, 1.0, 2.0)]
    assert loss.item() == pytest.approx((0.5 * phi[0] + 1.0 * phi[1] + 2.0 * phi[2]) / 3, abs=1e-6)


def test_uniapl_sums_weighted_terms_with_separate_populations():
    cfg = ObjectiveConfig(algorithm="uniapl", w_sft=0.5, w_rl=1.0, lambda_adv=0.3)
    w = StepWeights("uniapl", 0.5, 1.0, 0.3, 0.0, True)
    inp = _demo_and_rollout_batch()
    loss, m = objective_loss(inp, w, cfg, step_counts([inp]))
    sft = (0.5 + 1.0 + 2.0) / 3  # mean over the 3 demo tokens only
    pg = -0.8  # on-policy (ratio 1): -A averaged over the 2 rollout tokens
    adv = 0.4
    assert m["loss/sft"].item() == pytest.approx(0.5 * sft, abs=1e-6)
    assert m["loss/pg"].item() == pytest.approx(pg, abs=1e-6)
    assert m["loss/adv"].item() == pytest.approx(0.3 * adv, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * sft + pg + 0.3 * adv, abs=1e-6)
    loss.backward()
    # demo token: 0.5 * (-1/3); rollout token: on-policy gradient of -A*r is -A, times 1/2 per term.
    want = torch.tensor([0.0, -0.5 / 3, -0.5 / 3, -0.5 / 3, (-0.8 + 0.3 * 0.4) / 2, (-0.8 + 0.3 * 0.4) / 2])
    torch.testing.assert_close(inp.logprobs.grad, want, atol=1e-6, rtol=0)


def test_counts_and_global_normaliser_are_used_not_the_local_one():
    cfg, w = _grpo()
    inp = _rollout_batch()
    counts = step_counts([inp])
    assert counts == GlobalCounts(demo_tokens=0, demo_seqs=0, rollout_tokens=5, rollout_seqs=2)
    doubled = GlobalCounts(0, 0, 10, 4)  # as if another micro-batch of the step held as much again
    half, _ = objective_loss(inp, w, cfg, doubled)
    full, _ = objective_loss(_rollout_batch(), w, cfg, counts)
    assert half.item() == pytest.approx(full.item() / 2, abs=1e-7)


def test_garbage_outside_the_mask_never_leaks():
    cfg, w = _grpo(kl_coef=0.1, tis_cap=2.0)
    inp = _rollout_batch()
    inp.old_logprobs[0] = float("nan")  # the prompt token
    inp.ref_logprobs = inp.old_logprobs.clone()
    inp.ref_logprobs[6] = -1e30
    inp.engine_logprobs = inp.old_logprobs.clone()
    inp.engine_logprobs[0] = float("inf")
    loss, _ = objective_loss(inp, w, cfg, step_counts([inp]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(inp.logprobs.grad).all()


def test_seq_ids_from_cu_seqlens():
    ids = seq_ids_from_cu_seqlens(torch.tensor([0, 2, 5]), 7)
    assert ids.tolist() == [0, 0, 1, 1, 1, -1, -1]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(old_logprobs=torch.zeros(6)), "LossInputs.old_logprobs: expected shape [T]=[7]"),
        (dict(seq_ids=torch.tensor([0, 0, 0, 0, 1, 2, -1])), "LossInputs.seq_ids: values must lie in [-1, 1]"),
        (dict(seq_ids=torch.tensor([0.0] * 7)), "LossInputs.seq_ids: expected an integer tensor"),
        (dict(advantages=torch.zeros(3)), "LossInputs.advantages: expected shape [S]=[2]"),
        (dict(advantages=None), "LossInputs.advantages is needed: stage 'grpo'"),
        (dict(loss_mask=torch.tensor([0, 1, 1, 1, 1, 1, 1])), "a trained token has seq_id -1"),
    ],
)
def test_bad_inputs_name_the_field(change, message):
    cfg, w = _grpo()
    inp = _rollout_batch()
    for k, v in change.items():
        setattr(inp, k, v)
    with pytest.raises(ValueError) as err:
        objective_loss(inp, w, cfg, GlobalCounts(0, 0, 5, 2))
    assert message in str(err.value)


def test_missing_inputs_for_enabled_terms_are_reported():
    w = StepWeights("grpo", 0.0, 1.0, 0.0, 0.0, True)
    for cfg, field in (
        (ObjectiveConfig(algorithm="grpo", kl_coef=0.1), "ref_logprobs"),
        (ObjectiveConfig(algorithm="grpo", entropy_coef=0.1), "entropy"),
        (ObjectiveConfig(algorithm="grpo", tis_cap=2.0), "engine_logprobs"),
    ):
        inp = _rollout_batch()
        with pytest.raises(ValueError, match=f"LossInputs.{field} is needed"):
            objective_loss(inp, w, cfg, step_counts([inp]))
