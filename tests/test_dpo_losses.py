"""DPO, IPO and SimPO maths against numbers worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from forgepipe.stages.dpo.losses import (
    PreferenceSettings,
    dpo_loss,
    ipo_loss,
    pair_metrics,
    preference_loss,
    sequence_logprob,
    sequence_logps,
    simpo_loss,
)

LN3 = math.log(3.0)
BIG = 1e4  # finite garbage where nothing is scored


def test_sequence_logps_sums_response_tokens_only():
    # V = 2, the logits at the positions kept per row (those that predict a response token), K = 3.
    # Row 0 (ids [0, 1, 1, 0], prompt 2): position 1 predicts id 1 with logits [0, ln3]: p = 3/4;
    #   position 2 predicts id 0 with [0, ln3]: p = 1/4. sum = ln(3/16), 2 tokens; slot 3 is filler.
    # Row 1 (ids [0, 1, 0, pad], prompt 1): position 0 predicts id 1 with [0, 0]: p = 1/2; position 1
    #   predicts id 0 with [ln3, 0]: p = 3/4. sum = ln(3/8), 2 tokens; slot 3 is filler.
    logits = torch.tensor([[[0.0, LN3], [0.0, LN3], [BIG, -BIG]],
                           [[0.0, 0.0], [LN3, 0.0], [-BIG, BIG]]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 0, -100], [1, 0, -100]])
    summed, tokens = sequence_logps(logits, targets)
    assert_close(summed, torch.tensor([math.log(3 / 16), math.log(3 / 8)]))
    assert_close(tokens, torch.tensor([2.0, 2.0]))
    summed.sum().backward()
    # No gradient reaches the filler slots.
    assert logits.grad[0, 2].abs().sum() == 0 and logits.grad[1, 2].abs().sum() == 0
    # d ln softmax(z)[1] / dz = [-p0, 1 - p1] = [-1/4, 1/4] at row 0, slot 0.
    assert_close(logits.grad[0, 0], torch.tensor([-0.25, 0.25], dtype=torch.float64))


def test_length_normalisation_for_ipo_and_simpo_only():
    summed, tokens = torch.tensor([-3.0, -8.0, 0.0]), torch.tensor([3.0, 4.0, 0.0])
    assert_close(sequence_logprob(summed, tokens, "dpo"), summed)
    # -3/3 = -1, -8/4 = -2, and a row with no scored token gives 0, not NaN.
    for loss in ("ipo", "simpo"):
        assert_close(sequence_logprob(summed, tokens, loss), torch.tensor([-1.0, -2.0, 0.0]))


def test_dpo_loss_with_and_without_label_smoothing():
    # beta = 0.5, log-ratio gap h = 2 ln3: beta h = ln3, sigmoid(ln3) = 3/4 -> -ln(3/4) = 0.2876821.
    # h = 0: ln 2. Label smoothing eps: -(1-eps) ls(z) - eps ls(-z) = -ls(z) + eps z;
    # eps = 0.1: 0.2876821 + 0.1 ln3 = 0.3975433; at z = 0 still ln 2.
    chosen, rejected = torch.tensor([1.5, 0.3]), torch.tensor([1.5 - 2 * LN3, 0.3])
    assert_close(dpo_loss(chosen, rejected, 0.5), torch.tensor([0.2876821, math.log(2)]))
    assert_close(dpo_loss(chosen, rejected, 0.5, 0.1), torch.tensor([0.3975433, math.log(2)]))


def test_dpo_gradient_is_beta_times_the_misranked_probability():
    # d/dh -ln sigmoid(beta h) = -beta sigmoid(-beta h) = -0.5 * 1/4 at beta h = ln3.
    h = torch.tensor([2 * LN3], requires_grad=True)
    dpo_loss(h, torch.zeros(1), 0.5).sum().backward()
    assert_close(h.grad, torch.tensor([-0.125]))


def test_ipo_regresses_the_gap_onto_one_over_two_beta():
    # beta = 0.25: target 1/(2 beta) = 2. Gaps h = [2, -1, 3] -> (h - 2)^2 = [0, 9, 1].
    losses = ipo_loss(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.0, 1.0, -1.0]), 0.25)
    assert_close(losses, torch.tensor([0.0, 9.0, 1.0]))


def test_simpo_margin_and_label_smoothing():
    # beta 2, gamma/beta 0.5. Pair 0: averages -1 vs -2: h = 1 - 0.5, z = 2 * 0.5 = 1:
    #   ln(1 + e^-1) = 0.3132617. Pair 1: -2 vs -2: z = 2 * (0 - 0.5) = -1: ln(1 + e) = 1.3132617.
    # eps = 0.2 adds eps z: 0.3132617 + 0.2 = 0.5132617, 1.3132617 - 0.2 = 1.1132617.
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])
    assert_close(simpo_loss(chosen, rejected, 2.0, 0.5), torch.tensor([0.3132617, 1.3132617]))
    assert_close(simpo_loss(chosen, rejected, 2.0, 0.5, 0.2), torch.tensor([0.5132617, 1.1132617]))


def test_preference_loss_rewards_and_metrics_dpo():
    # beta 1. Pair 0: policy -4 / -7, reference -5 / -6: log-ratios +1 and -1, h = 2:
    #   ln(1 + e^-2) = 0.1269280; rewards 1 and -1.
    # Pair 1: policy -3 / -2, reference -3 / -3: log-ratios 0 and 1, h = -1: ln(1 + e) = 1.3132617;
    #   rewards 0 and 1. Means: chosen 0.5, rejected 0, margin 0.5, accuracy 1/2.
    s = PreferenceSettings(loss="dpo", beta=1.0)
    out = preference_loss(s, torch.tensor([-4.0, -3.0]), torch.tensor([-7.0, -2.0]),
                          torch.tensor([-5.0, -3.0]), torch.tensor([-6.0, -3.0]))
    assert_close(out.losses, torch.tensor([0.1269280, 1.3132617]))
    assert_close(out.chosen_rewards, torch.tensor([1.0, 0.0]))
    assert_close(out.rejected_rewards, torch.tensor([-1.0, 1.0]))
    metrics = pair_metrics(out)
    assert {k: round(v.item(), 6) for k, v in metrics.items()} == {
        "reward_chosen": 0.5, "reward_rejected": 0.0, "margin": 0.5, "accuracy": 0.5}


def test_preference_loss_simpo_ignores_the_reference_and_ipo_needs_it():
    # SimPO beta 2, ratio 0.5, averages as in test_simpo_margin_and_label_smoothing; rewards
    # beta * avg: -2 / -4 and -4 / -4: margins 2 and 0 (a tie is not counted as correct).
    s = PreferenceSettings(loss="simpo", beta=2.0, gamma_beta_ratio=0.5)
    out = preference_loss(s, torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0]))
    assert_close(out.losses, torch.tensor([0.3132617, 1.3132617]))
    assert pair_metrics(out)["accuracy"].item() == 0.5
    assert_close(pair_metrics(out)["margin"], torch.tensor(1.0))
    with pytest.raises(ValueError, match="reference"):
        preference_loss(PreferenceSettings(loss="ipo"), torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="unknown"):
        PreferenceSettings(loss="kto")


def test_rewards_carry_no_gradient_and_losses_are_float32():
    policy = torch.tensor([-4.0, -3.0], dtype=torch.bfloat16, requires_grad=True)
    out = preference_loss(PreferenceSettings(), policy, policy.detach() - 1, policy.detach(), policy.detach())
    assert out.losses.dtype == torch.float32
    assert not out.chosen_rewards.requires_grad and out.losses.requires_grad
