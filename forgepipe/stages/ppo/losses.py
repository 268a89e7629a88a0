"""PPO maths for stage 3, as small pure torch functions.

The formulas follow InstructGPT / DeepSpeed-Chat step 3 / OpenRLHF. Nothing
here knows about DeepSpeed, models or ranks, so every function is checked
against hand-worked numbers in tests/test_ppo_losses.py.

Shapes: per-token tensors are [B, T] over the RESPONSE positions only (the
prompt is already cut off), with ``mask`` 1 on real response tokens and 0 on
padding. Padded positions may hold anything (even NaN/inf): every function
zeroes them before use, so they change neither results nor gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = [
    "masked_mean",
    "masked_whiten",
    "kl_penalty",
    "shaped_rewards",
    "gae",
    "policy_loss",
    "value_loss",
    "entropy_from_logits",
    "logprobs_from_logits",
    "ema_update",
]


def _check_same_shape(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Broadcasting a [B] against a [B, T] silently gives wrong numbers; fail instead."""
    for name, t in tensors.items():
        if t.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(mask.shape)} like mask")


def _zero_pad(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero padded entries with `where` (not `x * mask`), so NaN/inf padding cannot leak into values or grads."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (all of them, or along ``dim``).

    Losses are averaged over real tokens only, so a batch with more padding is
    not weighted down. An empty selection gives 0 rather than NaN.
    """
    _check_same_shape(mask, x=x)
    m = mask.to(x.dtype)
    total = _zero_pad(x, mask).sum() if dim is None else _zero_pad(x, mask).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to zero mean / unit variance using the masked entries only.

    Advantages are whitened so the policy step size does not depend on the
    reward scale; padding must not enter the statistics or it would bias them.
    Uses the population (biased) variance. With ``shift_mean=False`` the mean
    is kept (only the scale changes), as in OpenRLHF/TRL for rewards.
    Padded positions of the result are 0.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _zero_pad(out, mask)


def kl_penalty(logp_actor: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate between actor and reference: the k1 log-ratio ``logp_actor - logp_ref``.

    Its expectation under the actor's samples is KL(actor || ref); it is what
    InstructGPT and DeepSpeed-Chat subtract from the reward to keep the
    policy near the SFT model.
    """
    return logp_actor - logp_ref


@torch.no_grad()
def shaped_rewards(
    score: torch.Tensor,
    logp_actor: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float,
) -> torch.Tensor:
    """Per-token rewards [B, T]: ``-kl_coef * KL`` on every real token, plus the clipped score on the last one.

    The reward model scores the whole response once, so its (clipped, to
    bound outliers) score lands on each row's last real token -- the index of
    the last 1 in ``mask``, so rows may have different lengths. Padding gets 0.
    Rewards are data for PPO, never differentiated, hence no_grad.
    """
    _check_same_shape(mask, logp_actor=logp_actor, logp_ref=logp_ref)
    if score.shape != mask.shape[:1]:
        raise ValueError(f"score has shape {tuple(score.shape)}, expected ({mask.shape[0]},)")
    rewards = _zero_pad(-kl_coef * kl_penalty(logp_actor, logp_ref), mask)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values  # -1: row has no response
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    clipped = score.to(rewards.dtype).clamp(-reward_clip, reward_clip)
    rewards[rows, last[has_tokens]] += clipped[has_tokens]
    return rewards


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, backwards over time: ``(advantages, returns)``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``.
    Positions after the last real token are terminal (their value and
    advantage count as 0), so each row bootstraps from 0 past its own end.
    ``returns = advantages + values`` is the critic's target. Both are
    targets, computed without gradients; padding is 0.
    """
    _check_same_shape(mask, rewards=rewards, values=values)
    rewards, values = _zero_pad(rewards, mask), _zero_pad(values, mask)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = _zero_pad(delta + gamma * lam * next_advantage, mask[:, t])
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t], advantage
    return advantages, advantages + values


def policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate: ``(loss, clip_fraction, approx_kl)``.

    ``loss = masked_mean(-min(r * A, clip(r, 1-c, 1+c) * A))`` with ``r = exp(logp_new - logp_old)``:
    the pessimistic bound stops one batch from moving the policy far from the
    one that sampled it. ``clip_fraction`` is the share of real tokens where
    the clipped term wins (their gradient is zero) and ``approx_kl`` is
    ``masked_mean(logp_old - logp_new)``; both are detached diagnostics.
    """
    _check_same_shape(mask, logp_new=logp_new, logp_old=logp_old, advantages=advantages)
    log_ratio = _zero_pad(logp_new, mask) - _zero_pad(logp_old, mask).detach()
    ratio = torch.exp(log_ratio)
    advantages = _zero_pad(advantages, mask).detach()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    loss = masked_mean(-torch.min(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped < unclipped).to(ratio.dtype), mask)
        approx_kl = masked_mean(-log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values_new: torch.Tensor,
    values_old: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> torch.Tensor:
    """Clipped critic loss: ``0.5 * masked_mean(max((v - R)^2, (clip(v, v_old-c, v_old+c) - R)^2))``.

    Like the policy clip, this keeps the value head from jumping far from the
    values the advantages were computed with (DeepSpeed-Chat / OpenRLHF).
    """
    _check_same_shape(mask, values_new=values_new, values_old=values_old, returns=returns)
    v = _zero_pad(values_new, mask)
    v_old = _zero_pad(values_old, mask).detach()
    target = _zero_pad(returns, mask).detach()
    v_clipped = v_old + (v - v_old).clamp(-clip, clip)
    loss = torch.max((v - target) ** 2, (v_clipped - target) ** 2)
    return 0.5 * masked_mean(loss, mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dim, [B, T, V] -> [B, T], in float32.

    ``H = -sum(p * log p)``: a diagnostic of how peaked the policy is (collapse
    shows up as entropy going to 0). Tokens with p = 0 (logit -inf, e.g. after
    top-k masking) count 0 instead of 0 * -inf = NaN.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    return -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under its logits: [B, T, V], [B, T] -> [B, T], in float32.

    Computed as ``z[label] - logsumexp(z)`` (stable, no full log_softmax kept
    for the gather) in float32, because bf16 log-probs are too coarse for the
    PPO ratio. ``labels`` must be valid token ids (no -100) -- mask instead.
    """
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def ema_update(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """In place: ``ema = decay * ema + (1 - decay) * param`` for each pair.

    DeepSpeed-Chat keeps an EMA copy of the actor for export, which is
    smoother than the last PPO step. Lists must pair up one to one.
    """
    for ema, param in zip(ema_params, params, strict=True):
        ema.lerp_(param.detach().to(device=ema.device, dtype=ema.dtype), 1.0 - decay)
