"""PPO maths against numbers worked out by hand in the comments.

Shapes are [B=2, T=3]; row 1 is padded at its last position unless stated.
Padded entries are filled with NaN/inf/huge garbage: they must change neither
results nor gradients.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from forgepipe.stages.ppo.losses import (
    ema_update,
    entropy_from_logits,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    shaped_rewards,
    value_loss,
)

NAN, INF = float("nan"), float("inf")
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# --- masked_mean / masked_whiten ------------------------------------------------


def test_masked_mean_ignores_padding_overall_and_per_row():
    x = t([[1, 2, 3], [4, 5, NAN]])
    # (1+2+3+4+5)/5 = 3; per row: 6/3 = 2, 9/2 = 4.5
    assert_close(masked_mean(x, MASK), t(3.0))
    assert_close(masked_mean(x, MASK, dim=1), t([2.0, 4.5]))
    assert_close(masked_mean(x, MASK.bool(), dim=1), t([2.0, 4.5]))


def test_masked_mean_empty_selection_is_zero_not_nan():
    x = t([[1, 2, 3], [INF, NAN, 7]])
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert_close(masked_mean(x, mask, dim=1), t([1.0, 0.0]))
    assert_close(masked_mean(x, torch.zeros_like(mask)), t(0.0))


def test_masked_whiten_uses_masked_entries_only():
    # real entries 1..5: mean 3, population var (4+1+0+1+4)/5 = 2 -> (x - 3) / sqrt(2)
    s = math.sqrt(2.0)
    expected = t([[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]])
    for garbage in (999.0, -1e6, NAN):
        x = t([[1, 2, 3], [4, 5, garbage]])
        assert_close(masked_whiten(x, MASK, eps=0.0), expected)
    # shift_mean=False keeps the mean, rescales only: (x - 3)/sqrt(2) + 3 on real tokens
    x = t([[1, 2, 3], [4, 5, NAN]])
    assert_close(masked_whiten(x, MASK, shift_mean=False, eps=0.0), (expected + 3) * MASK)


# --- KL and shaped rewards ----------------------------------------------------


def test_kl_penalty_is_k1_log_ratio():
    assert_close(kl_penalty(t([[-1.0, -2.0]]), t([[-1.5, -1.0]])), t([[0.5, -1.0]]))


def test_shaped_rewards_kl_per_token_and_clipped_score_on_last_real_token():
    # 4 rows of different lengths: 3, 2, 1 and 0 real tokens.
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    logp_actor = t([[-1.0, -2.0, -1.0], [-0.5, -1.0, NAN], [-2.0, INF, 3.0], [NAN, 1.0, 2.0]])
    logp_ref = t([[-1.5, -1.0, -1.0], [-1.0, -1.0, 7.0], [-1.0, NAN, -9.0], [0.0, NAN, 0.0]])
    score = t([10.0, -0.7, -10.0, 3.0])
    # kl = actor - ref: row0 [0.5, -1, 0], row1 [0.5, 0], row2 [-1]; -0.1 * kl:
    #   row0 [-0.05, 0.1, 0] + clip(10, 5)=5 at t=2   -> [-0.05, 0.1, 5.0]
    #   row1 [-0.05, 0]      + -0.7 (inside) at t=1   -> [-0.05, -0.7, 0]
    #   row2 [0.1]           + clip(-10)=-5 at t=0    -> [-4.9, 0, 0]
    #   row3 no response: all zeros, its score goes nowhere
    expected = t([[-0.05, 0.1, 5.0], [-0.05, -0.7, 0.0], [-4.9, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rewards = shaped_rewards(score, logp_actor, logp_ref, mask, kl_coef=0.1, reward_clip=5.0)
    assert_close(rewards, expected)


def test_shaped_rewards_rejects_score_that_would_broadcast():
    logp = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="score"):
        shaped_rewards(t([[1.0], [2.0]]), logp, logp, MASK, kl_coef=0.1, reward_clip=5.0)


# --- GAE ----------------------------------------------------------------------


def test_gae_hand_worked_with_padded_row():
    # Row 0: rewards [0, 0, 1], values [.5, .5, .5], gamma 1, lam .95
    #   t=2: delta = 1 + 0 - .5 = .5                  A2 = .5
    #   t=1: delta = 0 + .5 - .5 = 0                  A1 = 0 + .95 * .5 = .475
    #   t=0: delta = 0                                A0 = .95 * .475 = .45125
    #   returns = A + V = [.95125, .975, 1.0]
    # Row 1 (length 2): rewards [0, 2], values [1, .5]; t=2 is padding -> terminal after t=1
    #   t=1: delta = 2 + 0 - .5 = 1.5                 A1 = 1.5
    #   t=0: delta = 0 + .5 - 1 = -.5                 A0 = -.5 + .95 * 1.5 = .925
    #   returns = [1.925, 2.0, 0]
    expected_adv = t([[0.45125, 0.475, 0.5], [0.925, 1.5, 0.0]])
    expected_ret = t([[0.95125, 0.975, 1.0], [1.925, 2.0, 0.0]])
    for garbage in (100.0, NAN, -INF):
        rewards = t([[0, 0, 1], [0, 2, garbage]])
        values = t([[0.5, 0.5, 0.5], [1.0, 0.5, garbage]])
        adv, ret = gae(rewards, values, MASK, gamma=1.0, lam=0.95)
        assert_close(adv, expected_adv)
        assert_close(ret, expected_ret)


def test_gae_uses_gamma():
    # rewards [0, 0, 1], values [.5, .5, .5], gamma .9, lam .5 (gamma * lam = .45)
    #   t=2: delta = .5                               A2 = .5
    #   t=1: delta = .9 * .5 - .5 = -.05              A1 = -.05 + .45 * .5 = .175
    #   t=0: delta = -.05                             A0 = -.05 + .45 * .175 = .02875
    adv, ret = gae(t([[0, 0, 1]]), t([[0.5, 0.5, 0.5]]), torch.ones(1, 3), gamma=0.9, lam=0.5)
    assert_close(adv, t([[0.02875, 0.175, 0.5]]))
    assert_close(ret, t([[0.52875, 0.675, 1.0]]))


def test_gae_outputs_carry_no_gradient():
    values = t([[0.5, 0.5, 0.5], [1.0, 0.5, 0.0]]).requires_grad_()
    rewards = t([[0, 0, 1], [0, 2, 0]]).requires_grad_()
    adv, ret = gae(rewards, values, MASK, gamma=1.0, lam=0.95)
    assert not adv.requires_grad and not ret.requires_grad


# --- policy loss --------------------------------------------------------------

# logp_old = 0, so ratio r = exp(logp_new); clip c = 0.2 -> clip(r) in [0.8, 1.2]
#   row0 t0: r 1.5, A  1: r*A  1.5, clip*A  1.2 -> min  1.2, clip ACTIVE   (grad 0)
#   row0 t1: r 0.5, A  1: r*A  0.5, clip*A  0.8 -> min  0.5, inactive     (grad -r*A/5 = -0.1)
#   row0 t2: r 1.1, A -1: r*A -1.1, clip*A -1.1 -> min -1.1, inactive     (grad -r*A/5 =  0.22)
#   row1 t0: r 0.5, A -2: r*A -1.0, clip*A -1.6 -> min -1.6, clip ACTIVE   (grad 0)
#   row1 t1: r 1.0, A  3: r*A  3.0, clip*A  3.0 -> min  3.0, inactive     (grad -r*A/5 = -0.6)
#   loss = -(1.2 + 0.5 - 1.1 - 1.6 + 3.0) / 5 = -2.0 / 5 = -0.4; clip fraction 2/5
#   approx_kl = mean(old - new) = -(ln1.5 + ln.5 + ln1.1 + ln.5 + ln1) / 5 = -ln(.4125) / 5
POLICY_ADV = t([[1.0, 1.0, -1.0], [-2.0, 3.0, 0.0]])
POLICY_RATIO = [[1.5, 0.5, 1.1], [0.5, 1.0, 1.0]]


def _policy_inputs(garbage):
    logp_new = t(POLICY_RATIO).log()
    logp_new[1, 2] = garbage
    logp_new.requires_grad_()
    logp_old = torch.zeros(2, 3, dtype=torch.float64)
    logp_old[1, 2] = garbage
    adv = POLICY_ADV.clone()
    adv[1, 2] = garbage
    return logp_new, logp_old, adv.requires_grad_()  # advantages are targets: must get no grad


@pytest.mark.parametrize("garbage", [0.0, 50.0, NAN, INF])
def test_policy_loss_clip_active_and_inactive(garbage):
    logp_new, logp_old, adv = _policy_inputs(garbage)
    loss, clip_fraction, approx_kl = policy_loss(logp_new, logp_old, adv, MASK, clip=0.2)
    assert_close(loss, t(-0.4))
    assert_close(clip_fraction, t(0.4))
    assert_close(approx_kl, t(-math.log(0.4125) / 5))
    assert not clip_fraction.requires_grad and not approx_kl.requires_grad

    loss.backward()
    # zero where the clip is active and on padding, -r*A/N elsewhere
    assert_close(logp_new.grad, t([[0.0, -0.1, 0.22], [0.0, -0.6, 0.0]]))
    assert adv.grad is None


def test_policy_loss_without_clipping_is_plain_ratio_objective():
    # r = 1 everywhere (new == old): nothing clipped, loss = -mean(A) = -(1+1-1-2+3)/5 = -0.4
    logp = t([[-1.0, -2.0, -3.0], [-0.5, -0.1, 0.0]])
    loss, clip_fraction, approx_kl = policy_loss(logp, logp, POLICY_ADV, MASK, clip=0.2)
    assert_close(loss, t(-0.4))
    assert_close(clip_fraction, t(0.0))
    assert_close(approx_kl, t(0.0))


# --- value loss ---------------------------------------------------------------


# clip c = 0.2: v_clip = v_old + clamp(v - v_old, -.2, .2)
#   row0 t0: v 1.5, v_old 1, R 2: (v-R)^2 .25, v_clip 1.2 -> .64; max .64 (clipped term, grad 0)
#   row0 t1: v 1.1, v_old 1, R 0: 1.21, v_clip 1.1 -> 1.21;       max 1.21 (inside clip)
#   row0 t2: v 0.5, v_old 1, R 1: .25,  v_clip 0.8 -> .04;        max .25  (unclipped term wins)
#   row1 t0: v -.5, v_old 0, R 0: .25,  v_clip -.2 -> .04;        max .25
#   row1 t1: v 0.1, v_old 0, R 1: .81,  v_clip 0.1 -> .81;        max .81
#   loss = 0.5 * (.64 + 1.21 + .25 + .25 + .81) / 5 = 0.5 * 3.16 / 5 = 0.316
#   grad = 0.5 * 2 (v - R) / 5 where the unclipped term counts:
#          [[0, .22, -.1], [-.1, -.18, 0]]
@pytest.mark.parametrize("garbage", [0.0, -30.0, NAN, INF])
def test_value_loss_clip_active_and_inactive(garbage):
    values_new = t([[1.5, 1.1, 0.5], [-0.5, 0.1, garbage]]).requires_grad_()
    values_old = t([[1.0, 1.0, 1.0], [0.0, 0.0, garbage]])
    returns = t([[2.0, 0.0, 1.0], [0.0, 1.0, garbage]])
    loss = value_loss(values_new, values_old, returns, MASK, clip=0.2)
    assert_close(loss, t(0.316))
    loss.backward()
    assert_close(values_new.grad, t([[0.0, 0.22, -0.1], [-0.1, -0.18, 0.0]]))


def test_value_loss_without_clipping_is_half_mse():
    # v == v_old: nothing clipped; errors (v - R) = [1, -1, 2, 0, 0] -> 0.5 * (1+1+4)/5 = 0.6
    v = t([[1.0, 0.0, 3.0], [2.0, 5.0, 9.0]])
    returns = t([[0.0, 1.0, 1.0], [2.0, 5.0, 0.0]])
    assert_close(value_loss(v, v, returns, MASK, clip=0.2), t(0.6))


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), MASK, clip=0.2)
    with pytest.raises(ValueError, match="returns"):
        value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 1), MASK, clip=0.2)


# --- logits helpers -----------------------------------------------------------


def test_entropy_from_logits():
    # probs [.5, .25, .25]: H = .5 ln2 + 2 * .25 ln4 = 1.5 ln2; uniform over 4: ln4
    # a -inf logit (p = 0) counts 0, not NaN
    logits = torch.tensor([[[math.log(0.5), math.log(0.25), math.log(0.25), -INF], [0.0, 0.0, 0.0, 0.0]]])
    expected = torch.tensor([[1.5 * math.log(2), math.log(4)]])
    assert_close(entropy_from_logits(logits), expected)
    ent = entropy_from_logits(logits.to(torch.bfloat16))
    assert ent.dtype == torch.float32
    assert_close(ent, expected, atol=1e-2, rtol=0)


def test_logprobs_from_logits_gathers_stably_in_float32():
    # logits [1000, 0]: log p(0) = -ln(1 + e^-1000) = 0, log p(1) = -1000 (naive softmax overflows)
    # logits ln[.5, .25, .25] + 100: log p = ln .25 for label 2
    logits = torch.zeros(2, 2, 3)
    logits[0, 0] = torch.tensor([1000.0, 0.0, -INF])
    logits[0, 1] = torch.tensor([1000.0, 0.0, -INF])
    logits[1, 0] = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.25)]) + 100
    logits[1, 1] = torch.tensor([2.0, 2.0, 2.0])
    labels = torch.tensor([[0, 1], [2, 1]])
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32 and out.shape == (2, 2)
    assert_close(out, torch.tensor([[0.0, -1000.0], [math.log(0.25), -math.log(3)]]))
    # bf16 logits are upcast: result is float32
    assert logprobs_from_logits(logits[1:].to(torch.bfloat16), labels[1:]).dtype == torch.float32


def test_logprobs_from_logits_gradient_is_onehot_minus_softmax():
    # d/dz [z_y - logsumexp(z)] = onehot(y) - softmax(z); z = 0 over 4 -> [.75, -.25, -.25, -.25]
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[0]])).sum().backward()
    assert_close(logits.grad, torch.tensor([[[0.75, -0.25, -0.25, -0.25]]]))


# --- EMA ----------------------------------------------------------------------


def test_ema_update_in_place_without_grad():
    # ema = .9 * ema + .1 * p: [1, 2] with [3, 0] -> [1.2, 1.8]; 10 with -10 -> 8
    ema = [torch.tensor([1.0, 2.0]), torch.tensor([[10.0]])]
    params = [torch.tensor([3.0, 0.0], requires_grad=True), torch.tensor([[-10.0]], requires_grad=True)]
    before = [e.data_ptr() for e in ema]
    ema_update(ema, params, decay=0.9)
    assert_close(ema[0], torch.tensor([1.2, 1.8]))
    assert_close(ema[1], torch.tensor([[8.0]]))
    assert [e.data_ptr() for e in ema] == before
    assert all(e.grad_fn is None and not e.requires_grad for e in ema)


def test_ema_update_casts_to_ema_dtype_and_rejects_unpaired_lists():
    ema = [torch.tensor([1.0], dtype=torch.float64)]
    ema_update(ema, [torch.tensor([0.0], dtype=torch.bfloat16)], decay=0.75)
    assert ema[0].dtype == torch.float64
    assert_close(ema[0], torch.tensor([0.75], dtype=torch.float64))
    with pytest.raises(ValueError):
        ema_update(ema, [], decay=0.5)
