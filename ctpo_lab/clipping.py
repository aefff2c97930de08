"""Clip windows, the clipped per-token surrogates, and the advantage-aware "is this token clipped" masks.

All windows are expressed in log space as bounds [lower_t, upper_t] on log w_t:

* ``ppo``        ratio-space asymmetric PPO clip: w ∈ [1 − ε_low, 1 + ε_high]
                 (bounds log(1 − ε_low), log(1 + ε_high); the clamp itself is done in ratio space, as verl).
* ``log_window`` CTPO-LA: log w ∈ [−ε_low·s_t, ε_high·s_t], s_t = max(t, 1)^p (p = 0: a fixed log window).
* ``detached_clip`` (CISPO) the weight is clipped to [1 − ε_low, 1 + ε_high] but its gradient is always kept
                 (CISPO, verl ``cispo``: loss = −A · sg(clip(w)) · log π_t, whose value contains log π_t itself;
                 ``clipped_term_active`` = w ≠ clip(w), on either side whatever the sign of A, as verl counts it).
* ``gppo``       (GPPO, arXiv 2508.07629) PPO's clip in the forward pass; in the clipped region the gradient is
                 kept, bounded by the clip: loss = −A · sg(v) · w/sg(w), v = min(w, 1+ε_high) for A > 0,
                 max(w, 1−ε_low) for A < 0 (value −A·v, gradient −A·v·∇log π everywhere).
* ``none``       no clip (plain importance-weighted policy gradient).

Per-token PPO-style loss (the minus sign makes it a loss to minimise)::

    pg1 = −A·w,  pg2 = −A·clip(w),  c1 = max(pg1, pg2)
    dual clip (A < 0 only):  pg3 = −A·d_t,  loss_t = min(pg3, c1)

with d_t = c (ratio-space dual clip, PPO) or d_t = exp(ε_c·s_t) (CTPO-LA).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["CLIP_RULES", "ClipRule", "ClipOutput", "clip_window", "dual_clip_bound", "clipped_surrogate"]

ClipRule = Literal["ppo", "log_window", "detached_clip", "gppo", "none"]
CLIP_RULES: tuple[str, ...] = ("ppo", "log_window", "detached_clip", "gppo", "none")


class ClipOutput(NamedTuple):
    """Result of :func:`clipped_surrogate`; every tensor is [B, T] (bool masks are *not* restricted to valid
    tokens: combine them with the response mask before counting)."""

    per_token_loss: Tensor  #: loss_t (differentiable)
    lower: Tensor  #: lower bound on log w_t (may be −inf)
    upper: Tensor  #: upper bound on log w_t (may be +inf)
    clipped_high: Tensor  #: A > 0 and log w_t > upper_t (gradient removed by the clip)
    clipped_low: Tensor  #: A < 0 and log w_t < lower_t
    clipped_dual: Tensor  #: A < 0 and the dual clip is the active term
    clipped_term_active: Tensor  #: pg2 > pg1 (verl's ``pg_clipfrac`` indicator)


def _scale(position: Tensor, exponent: float, dtype: torch.dtype) -> Tensor:
    if exponent == 0.0:
        return torch.ones((), dtype=dtype, device=position.device)
    return position.clamp(min=1).to(dtype).pow(exponent)


def clip_window(
    rule: str, position: Tensor, eps_low: float, eps_high: float, exponent: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Log-space bounds (lower_t, upper_t) of a clip rule, each broadcastable to [B, T].

    ``log_window``: (−ε_low·s_t, ε_high·s_t) with s_t = max(t,1)^exponent.
    ``ppo``/``detached_clip``: (log(1−ε_low), log(1+ε_high)) (−inf when ε_low ≥ 1).  ``none``: (−inf, +inf).
    """
    device = position.device
    if rule == "log_window":
        s = _scale(position, exponent, dtype)
        return -eps_low * s, eps_high * s
    if rule in ("ppo", "detached_clip", "gppo"):
        lo = math.log(1.0 - eps_low) if eps_low < 1.0 else -math.inf
        return (
            torch.tensor(lo, dtype=dtype, device=device),
            torch.tensor(math.log1p(eps_high), dtype=dtype, device=device),
        )
    if rule == "none":
        inf = torch.tensor(math.inf, dtype=dtype, device=device)
        return -inf, inf
    raise ValueError(f"clip: unknown clip rule {rule!r}; expected one of {CLIP_RULES}")


def dual_clip_bound(
    rule: str, position: Tensor, dual_clip: float | None, exponent: float, dtype: torch.dtype
) -> Tensor | None:
    """Ratio-space dual-clip bound d_t (A < 0: no gradient once w_t > d_t), broadcastable to [B, T].

    ``log_window``: d_t = exp(ε_c·s_t), s_t = max(t,1)^exponent.  ``ppo``/``none``: d_t = c.  ``detached_clip`` and
    ``gppo`` have no dual clip (None), nor has any rule with ``dual_clip=None``.
    """
    if dual_clip is None or rule in ("detached_clip", "gppo"):
        return None
    if rule == "log_window":
        return (dual_clip * _scale(position, exponent, dtype)).exp()
    if rule in ("ppo", "none"):
        return torch.tensor(dual_clip, dtype=dtype, device=position.device)
    raise ValueError(f"clip: unknown clip rule {rule!r}; expected one of {CLIP_RULES}")


def clipped_surrogate(
    rule: str,
    log_weight: Tensor,
    advantages: Tensor,
    position: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    exponent: float = 0.0,
    dual_clip: float | None = None,
    log_prob: Tensor | None = None,
) -> ClipOutput:
    """Per-token clipped policy-gradient loss and its clip masks.

    Parameters
    ----------
    rule : {"ppo", "log_window", "detached_clip", "none"}
    log_weight : Tensor [B, T]
        Stop-gradient log-weight log w_t (value X_t, gradient through log π_t only).
    advantages : Tensor [B, T]
        A_t (already broadcast over tokens).
    position : Tensor [B, T], int
        1-based valid-token positions t.
    eps_low, eps_high : float
        Window half-widths (ratio space for ``ppo``/``detached_clip``, log space ×s_t for ``log_window``).
    exponent : float
        p in s_t = max(t, 1)^p (``log_window`` only).
    dual_clip : float, optional
        ``ppo``: the ratio-space dual-clip constant c > 1.  ``log_window``: ε_c, the dual bound being
        exp(ε_c·s_t).  None disables the dual clip.
    log_prob : Tensor [B, T], optional
        log π_t (differentiable, 0 on masked-out tokens): required by ``detached_clip``, whose value is
        −A·sg(clip(w))·log π_t.

    Returns
    -------
    ClipOutput
    """
    dtype = log_weight.dtype
    lower, upper = clip_window(rule, position, eps_low, eps_high, exponent, dtype)
    weight = log_weight.exp()
    if rule == "ppo":
        clipped = weight.clamp(1.0 - eps_low, 1.0 + eps_high)
    elif rule in ("log_window", "none"):
        clipped = torch.maximum(torch.minimum(log_weight, upper), lower).exp()
    elif rule == "detached_clip":
        # the clipped weight multiplies the score, never zeroes it
        if log_prob is None:
            raise ValueError("log_prob: the detached_clip rule needs log_prob (its value is −A·sg(clip(w))·log π)")
        clipped_value = weight.detach().clamp(1.0 - eps_low, 1.0 + eps_high)
        # value −A·c·log π; gradient through log_weight, so a binding safety cap removes it as for every rule
        per_token_loss = -advantages * clipped_value * (log_prob.detach() + (log_weight - log_weight.detach()))
        high = (advantages > 0) & (log_weight.detach() > upper)
        low = (advantages < 0) & (log_weight.detach() < lower)
        none = torch.zeros_like(high)
        return ClipOutput(per_token_loss, lower, upper, high, low, none, weight.detach() != clipped_value)
    elif rule == "gppo":
        w = weight.detach()
        bounded = torch.where(advantages > 0, w.clamp(max=1.0 + eps_high),
                              torch.where(advantages < 0, w.clamp(min=1.0 - eps_low), w))
        per_token_loss = -advantages * bounded * (log_weight - log_weight.detach()).exp()
        high = (advantages > 0) & (log_weight.detach() > upper)
        low = (advantages < 0) & (log_weight.detach() < lower)
        none = torch.zeros_like(high)
        return ClipOutput(per_token_loss, lower, upper, high, low, none, high | low)
    else:
        raise ValueError(f"clip: unknown clip rule {rule!r}; expected one of {CLIP_RULES}")

    pg1 = -advantages * weight
    pg2 = -advantages * clipped
    c1 = torch.maximum(pg1, pg2)
    negative = advantages < 0
    dual_bound = dual_clip_bound(rule, position, dual_clip, exponent, dtype)
    if dual_bound is not None:
        pg3 = -advantages * dual_bound
        dual_active = negative & (pg3 < c1)
        per_token_loss = torch.where(negative, torch.minimum(pg3, c1), c1)
    else:
        dual_active = torch.zeros_like(negative)
        per_token_loss = c1
    lw = log_weight.detach()
    high = (advantages > 0) & (lw > upper)
    low = negative & (lw < lower)
    return ClipOutput(per_token_loss, lower, upper, high, low, dual_active, (pg2 > pg1).detach())
