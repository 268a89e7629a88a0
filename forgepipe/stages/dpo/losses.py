"""DPO-family maths, as small pure torch functions (tested by hand in tests/test_dpo_losses.py).

Conventions follow TRL's DPOTrainer/CPOTrainer and the SimPO reference code:
- a sequence's log-probability is summed over its response tokens (EOS included), never over the
  prompt or padding (`sequence_logps`); IPO and SimPO use it divided by the response length
  (`LENGTH_NORMALISED`), so that longer answers are not favoured by their length alone;
- DPO (sigmoid): -log sigmoid(beta * h), h = (pi_c - ref_c) - (pi_r - ref_r); label smoothing eps
  (conservative DPO, cDPO) assumes a fraction eps of the labels are flipped:
  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h);
- IPO: (h - 1 / (2 beta))^2, a squared loss that does not push h to infinity on separable data;
- SimPO: reference-free, h = avg_c - avg_r, loss -log sigmoid(beta (h - gamma/beta)) (with the same
  label smoothing), gamma/beta being `gamma_beta_ratio`;
- implicit rewards: beta * (pi - ref) for DPO/IPO (the reward DPO's policy defines), beta * avg for
  SimPO; the accuracy counts pairs whose chosen reward is above the rejected one.
Everything is computed in float32 or wider, whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forgepipe.data.tokenize import IGNORE_INDEX
from forgepipe.stages.ppo.losses import logprobs_from_logits

LOSSES = ("dpo", "ipo", "simpo")
LENGTH_NORMALISED = frozenset({"ipo", "simpo"})
REFERENCE_FREE = frozenset({"simpo"})


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of the response tokens [N], response tokens [N]) of N sequences.

    `logits` [N, K, V] at the K positions kept per row (`data.collate.predicted_positions`: those
    that predict a response token or EOS), `targets` [N, K] the token each predicts, IGNORE_INDEX
    (-100) where a row has fewer. Those slots are zeroed with `where`: what the model computes there
    changes neither the sums nor (when finite) the gradients."""
    mask = targets != IGNORE_INDEX
    logp = logprobs_from_logits(logits, targets.clamp(min=0))
    summed = torch.where(mask, logp, torch.zeros((), dtype=logp.dtype, device=logp.device)).sum(-1)
    return summed, mask.sum(-1).to(logp.dtype)


def dpo_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair sigmoid DPO loss of policy/reference log-ratios (cDPO with label smoothing)."""
    h = chosen_logratio.float() - rejected_logratio.float()
    return smoothed_logsigmoid(beta * h, label_smoothing)


def ipo_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair IPO loss: the log-ratio gap regressed onto 1 / (2 beta)."""
    h = chosen_logratio.float() - rejected_logratio.float()
    return (h - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, beta: float,
               gamma_beta_ratio: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO loss of length-normalised log-probs, with target margin gamma = beta * ratio."""
    h = chosen_avg_logp.float() - rejected_avg_logp.float() - gamma_beta_ratio
    return smoothed_logsigmoid(beta * h, label_smoothing)


def smoothed_logsigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the logistic loss with eps of labels flipped."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


@dataclass(frozen=True)
class PreferenceSettings:
    """Which loss and its coefficients (the config's dpo section)."""

    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma_beta_ratio: float = 0.25

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown preference loss {self.loss!r} (known: {', '.join(LOSSES)})")


@dataclass(frozen=True)
class PreferenceOutput:
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached


def preference_loss(s: PreferenceSettings, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None) -> PreferenceOutput:
    """Per-pair losses and implicit rewards. The log-probs are the ones the loss reads: sums for DPO,
    per-token averages for IPO and SimPO (`sequence_logprob`); the reference's are ignored by SimPO."""
    if s.loss in REFERENCE_FREE:
        losses = simpo_loss(policy_chosen, policy_rejected, s.beta, s.gamma_beta_ratio, s.label_smoothing)
        chosen, rejected = policy_chosen.float(), policy_rejected.float()
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"loss {s.loss} needs the reference log-probs")
        chosen = policy_chosen.float() - ref_chosen.float()
        rejected = policy_rejected.float() - ref_rejected.float()
        losses = (dpo_loss(chosen, rejected, s.beta, s.label_smoothing) if s.loss == "dpo"
                  else ipo_loss(chosen, rejected, s.beta))
    return PreferenceOutput(losses, (s.beta * chosen).detach(), (s.beta * rejected).detach())


def sequence_logprob(summed: torch.Tensor, tokens: torch.Tensor, loss: str) -> torch.Tensor:
    """What the loss reads of a sequence: its summed log-prob, or the per-token mean for the
    length-normalised losses (a sequence with no scored token gives 0, not NaN)."""
    return summed / tokens.clamp(min=1) if loss in LENGTH_NORMALISED else summed


def pair_metrics(out: PreferenceOutput) -> dict[str, torch.Tensor]:
    """Batch means of what a run logs (device tensors: nothing waits for the device here)."""
    margin = out.chosen_rewards - out.rejected_rewards
    return {"reward_chosen": out.chosen_rewards.mean(), "reward_rejected": out.rejected_rewards.mean(),
            "margin": margin.mean(), "accuracy": (margin > 0).float().mean()}
