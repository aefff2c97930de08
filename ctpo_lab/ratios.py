"""Per-token log-ratios and the importance-ratio families, all in log space.

Notation (docs/theory.md §1.1): ℓ_t = log π(y_t|s_t) − log μ(y_t|s_t), L_t = Σ_{k≤t} ℓ_k over *valid* tokens,
t = number of valid tokens up to and including the current one (1-based).

Every family returns the *value* X_t of the log-weight of token t; the loss then uses the
stop-gradient form  log w_t = sg(X_t) + log π_t − sg(log π_t),  so that w_t has value e^{X_t} and
gradient ∇w_t = w_t ∇log π(y_t|s_t) (the gradient flows through the current token only, as in verl
and the CTPO authors' code).

| family                 | X_t                                   |
|------------------------|---------------------------------------|
| token                  | ℓ_t                                   |
| sequence               | L_T                     (same ∀t)     |
| sequence_geomean       | L_T / |y|               (same ∀t)     |
| cumulative             | L_t                                   |
| cumulative_geomean     | L_t / t                               |
| truncated_cumulative   | Σ_{k≤t} min(ℓ_k, log c̄)              |
| token_tis              | min(ℓ_t, log C)                       |

Masked-out tokens (padding, tool output) contribute ℓ = 0 and do not advance t. Values of the inputs at
masked-out positions are never read arithmetically (they are replaced with 0 before any operation), so
NaN there cannot leak into a result or a gradient.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "RATIO_FAMILIES",
    "RatioFamily",
    "DEFAULT_LOG_RATIO_CLAMP",
    "compute_dtype",
    "positions",
    "token_log_ratio",
    "cumulative_log_ratio",
    "sequence_log_ratio",
    "family_log_weight",
    "stop_gradient_log_weight",
]

RatioFamily = Literal[
    "token", "sequence", "sequence_geomean", "cumulative", "cumulative_geomean", "truncated_cumulative", "token_tis"
]
RATIO_FAMILIES: tuple[str, ...] = (
    "token",
    "sequence",
    "sequence_geomean",
    "cumulative",
    "cumulative_geomean",
    "truncated_cumulative",
    "token_tis",
)
#: Per-token clamp of ℓ_t used by verl and the CTPO code (keeps e^ℓ finite in float32).
DEFAULT_LOG_RATIO_CLAMP = 20.0
_TRUNCATED_FAMILIES = ("truncated_cumulative", "token_tis")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the estimators are computed in: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def positions(mask: Tensor) -> Tensor:
    """1-based position of each token among the valid tokens of its row.

    Parameters
    ----------
    mask : Tensor [B, T], bool or 0/1
        Valid-token mask.

    Returns
    -------
    Tensor [B, T], int64
        t = cumsum(mask) along the last axis. Masked-out tokens carry the count of the valid tokens before
        them (they do not advance t); they are never used with that value.
    """
    return mask.to(torch.int64).cumsum(dim=-1)


def token_log_ratio(
    log_prob: Tensor, old_log_prob: Tensor, mask: Tensor, clamp: float | None = DEFAULT_LOG_RATIO_CLAMP
) -> Tensor:
    """Per-token log-ratio ℓ_t = clamp(log π_t − log μ_t, −c, c), 0 on masked-out tokens.

    Shapes: log_prob, old_log_prob, mask [B, T] → [B, T]. Differentiable in ``log_prob``; masked-out entries
    (which may hold NaN) get a zero gradient.
    """
    # one `where` after the subtraction: NaN/inf at masked-out positions never reach a value or a gradient
    diff = torch.where(mask.bool(), log_prob - old_log_prob, 0.0)
    if clamp is not None:
        diff = diff.clamp(-clamp, clamp)
    return diff


def cumulative_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """L_t = Σ_{k≤t} ℓ_k · mask_k  ([B, T] → [B, T]); the log of the cumulative ratio ρ_{1:t}."""
    return torch.where(mask.bool(), log_ratio, 0.0).cumsum(dim=-1)


def sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """L_T = Σ_t ℓ_t · mask_t  ([B, T] → [B]); the log of the full-sequence ratio ρ_{1:T}."""
    return torch.where(mask.bool(), log_ratio, 0.0).sum(dim=-1)


def family_log_weight(
    family: str,
    log_ratio: Tensor,
    mask: Tensor,
    *,
    truncation: float | None = None,
    position: Tensor | None = None,
) -> Tensor:
    """Log-weight value X_t of a ratio family (no gradient semantics; see module docstring).

    Parameters
    ----------
    family : str
        One of :data:`RATIO_FAMILIES`.
    log_ratio : Tensor [B, T]
        ℓ_t, zero on masked-out tokens (as returned by :func:`token_log_ratio`).
    mask : Tensor [B, T]
        Valid-token mask.
    truncation : float, optional
        The cap C (token_tis) or c̄ (truncated_cumulative) in *ratio* space, > 0. Required for those two.
    position : Tensor [B, T], optional
        Precomputed :func:`positions` (avoids a second cumsum).

    Returns
    -------
    Tensor [B, T]
        X_t on valid tokens, 0 on masked-out tokens.
    """
    if family not in RATIO_FAMILIES:
        raise ValueError(f"family: unknown ratio family {family!r}; expected one of {RATIO_FAMILIES}")
    valid = mask.bool()
    if family in _TRUNCATED_FAMILIES:
        if truncation is None or not truncation > 0:
            raise ValueError(f"truncation: family {family!r} needs a truncation cap > 0, got {truncation!r}")
        capped = log_ratio.clamp(max=math.log(truncation))
    if family == "token":
        value = log_ratio
    elif family == "token_tis":
        value = capped
    elif family == "cumulative":
        value = cumulative_log_ratio(log_ratio, valid)
    elif family == "truncated_cumulative":
        value = cumulative_log_ratio(capped, valid)
    elif family == "cumulative_geomean":
        t = positions(valid) if position is None else position
        value = cumulative_log_ratio(log_ratio, valid) / t.clamp(min=1).to(log_ratio.dtype)
    else:  # sequence, sequence_geomean: one value per row, broadcast to its tokens
        total = sequence_log_ratio(log_ratio, valid)  # [B]
        if family == "sequence_geomean":
            total = total / valid.sum(dim=-1).clamp(min=1).to(log_ratio.dtype)
        value = total.unsqueeze(-1).expand_as(log_ratio)
    return torch.where(valid, value, 0.0)


def stop_gradient_log_weight(
    log_weight_value: Tensor, log_prob: Tensor, mask: Tensor, max_log_weight: float | None = None
) -> Tensor:
    """log w_t = min(sg(X_t) + log π_t − sg(log π_t), cap), 0 on masked-out tokens.

    The value equals X_t (capped); the gradient with respect to ``log_prob`` is 1 at token t (0 where the cap
    is active or the token is masked out), so that ∇w_t = w_t ∇log π_t.  Shapes: all [B, T].
    """
    log_w = log_weight_value.detach() + (log_prob - log_prob.detach())
    if max_log_weight is not None:
        log_w = log_w.clamp(max=max_log_weight)
    return torch.where(mask.bool(), log_w, 0.0)  # masked-out entries (maybe NaN) get value 0 and gradient 0
