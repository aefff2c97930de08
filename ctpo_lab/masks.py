"""Token and sequence masks applied after the surrogate: a dropped token contributes neither value nor gradient
(it stays in the aggregation's denominators, as in the reference implementations).

Every mask is computed without gradient from the per-token log-ratio ℓ_t = log π_t − log μ_t (and, for CPPO, the
probabilities), on valid tokens only.  ``mask_low``, ``mask_high``, ``mask_threshold``, ``mask_statistic``
(and, for CPPO, ``position_weight_min`` = w_min and ``prefix_budget`` = δ_b, with δ = ``mask_threshold``) of
:class:`ctpo_lab.losses.LossConfig` are the parameters; their meaning per rule:

================  ======================================================================  ====================
rule              a token is dropped when                                                 level
================  ======================================================================  ====================
``ratio_band``    r_t = e^{ℓ_t} ∉ [mask_low, mask_high]  (IcePop / MIS)                   token
``opsm``          its row has A < 0 and (1/n) Σ_t (log μ_t − log π_t) > mask_threshold   sequence
                  (off-policy sequence masking, DeepSeek-V3.2; TRL ``off_policy_mask``)
``trust_region``  its row has max_t k(ℓ_t) > mask_threshold, k = k2 = ℓ²/2                sequence
                  (``mask_statistic="k2"``) or k3 = e^{−ℓ} − 1 + ℓ (``"k3"``)
                  (trust-region masking; verl's ``seq_max_k2`` / ``seq_max_k3`` rejection)
``m2po``          it is among the tokens of largest ℓ² removed, largest first, until the   batch
                  mean of ℓ² over the remaining valid tokens is ≤ mask_threshold (M2PO)
``cppo``          A_t(r_t − 1) > 0 and not [w_t D_t ≤ δ and S_t ≤ δ + δ_b W_{t−1}]       prefix (+ a row
                  (CPPO, Binary-TV; see :func:`cppo_keep`)                                 quantile)
================  ======================================================================  ====================
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class MaskParameters(Protocol):
    """The fields of :class:`ctpo_lab.losses.LossConfig` the masks read (a LossConfig is one)."""

    mask_rule: str
    mask_low: float | None
    mask_high: float | None
    mask_threshold: float | None
    mask_statistic: str
    position_weight_min: float
    prefix_budget: float


__all__ = ["MaskParameters", "MASK_RULES", "BATCH_MASKS", "MASK_STATISTICS", "token_keep", "cppo_keep", "m2po_keep"]

MASK_RULES: tuple[str, ...] = ("none", "ratio_band", "opsm", "trust_region", "m2po", "cppo")
#: masks that read the whole batch (the exact laboratory measures them by Monte Carlo)
BATCH_MASKS: tuple[str, ...] = ("m2po",)
MASK_STATISTICS: tuple[str, ...] = ("k2", "k3")


def m2po_keep(log_ratio: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """M2PO (arXiv 2510.01161): remove the valid tokens of largest second moment ℓ², largest first, until the
    mean ℓ² of the remaining valid tokens is at most ``threshold`` (τ).  [B, T] → [B, T] bool keep mask."""
    m2 = torch.where(mask, log_ratio.square(), 0.0)
    flat = m2[mask]
    n = flat.numel()
    keep = mask.clone()
    if n == 0 or float(flat.mean()) <= threshold:
        return keep
    values, order = torch.sort(flat, descending=True)
    # removing the j largest leaves (total − prefix_j) / (n − j); the smallest j for which that is ≤ τ
    prefix = torch.cat([values.new_zeros(1), values.cumsum(0)])
    remaining = (prefix[-1] - prefix[:-1]) / torch.arange(n, 0, -1, device=values.device, dtype=values.dtype)
    ok = torch.nonzero(remaining <= threshold)
    j = int(ok[0]) if len(ok) else n
    flat_index = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    keep.view(-1)[flat_index[order[:j]]] = False
    return keep


def cppo_keep(log_prob: Tensor, old_log_prob: Tensor, log_ratio: Tensor, advantages: Tensor, mask: Tensor, *,
              delta: float, w_min: float, delta_b: float, quantile: float = 0.9, scale: float = 1.0) -> Tensor:
    """CPPO's Binary-TV keep mask (arXiv 2606.10968), [B, T] → [B, T] bool.

    Per row with valid length n and 1-based valid position t: D_t = |π_t − μ_t| (probabilities),
    w_t = 1 − (1 − w_min)(t − 1)/max(n − 1, 1), Z_t = w_t D_t, S_{t−1} = Σ_{j<t} Z_j, W_{t−1} = Σ_{j<t} w_j,
    the row budget δ_b' = clamp(scale·quantile_q(D), δ_b, 2δ_b) (linear interpolation over the row's valid
    tokens), and the token is feasible when Z_t ≤ min(δ, δ + δ_b' W_{t−1} − S_{t−1}).  A token is kept when it is
    feasible or its update does not push π away from μ in the advantage's direction (A_t (r_t − 1) ≤ 0).
    Computed in float32 at least (a bf16 prefix sum loses the budget over long responses).
    """
    if mask.numel() == 0:  # B = 0 or T = 0: nothing to keep (a quantile of an empty row is undefined)
        return mask.clone()
    dtype = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
    lp, old = log_prob.detach().to(dtype), old_log_prob.to(dtype)
    d = torch.where(mask, (lp.exp() - old.exp()).abs(), 0.0)
    n = mask.sum(-1, keepdim=True).to(dtype)
    t = mask.to(torch.int64).cumsum(-1).to(dtype)
    w = torch.where(mask, 1.0 - (1.0 - w_min) * (t - 1.0) / (n - 1.0).clamp(min=1.0), 0.0)
    z = w * d
    s_prev = z.cumsum(-1) - z
    w_prev = w.cumsum(-1) - w
    q = torch.nanquantile(torch.where(mask, d, torch.nan), quantile, dim=-1, keepdim=True)
    budget = torch.where(n > 0, (scale * q).clamp(min=delta_b, max=2 * delta_b), delta_b)
    threshold = torch.minimum(torch.full_like(z, delta), delta + budget * w_prev - s_prev)
    feasible = z <= threshold
    toward = advantages.to(dtype) * (log_ratio.detach().to(dtype).exp() - 1.0) <= 0
    return mask & (feasible | toward)


def token_keep(cfg: MaskParameters, log_prob: Tensor, old_log_prob: Tensor, log_ratio: Tensor, advantages: Tensor,
               mask: Tensor) -> Tensor | None:
    """The keep mask [B, T] (bool, False on masked-out tokens) of ``cfg.mask_rule``; None for ``"none"``.

    ``log_ratio`` is ℓ_t as the loss uses it (0 on masked-out tokens), ``advantages`` [B, T] (0 there too).
    """
    rule = cfg.mask_rule
    if rule == "none":
        return None
    with torch.no_grad():
        ell = log_ratio.detach()
        if rule == "ratio_band":
            r = ell.exp()
            return mask & (r >= cfg.mask_low) & (r <= cfg.mask_high)
        n = mask.sum(-1).clamp(min=1).to(ell.dtype)
        if rule == "opsm":
            mean_kl = torch.where(mask, -ell, 0.0).sum(-1) / n
            negative = (torch.where(mask, advantages, 0.0) < 0).any(-1)
            dropped = negative & (mean_kl > cfg.mask_threshold)
            return mask & ~dropped.unsqueeze(-1)
        if rule == "trust_region":
            k = ell.square() / 2 if cfg.mask_statistic == "k2" else (-ell).exp() - 1.0 + ell
            # amax over an empty last dimension raises: a row with no token has worst statistic 0
            worst = torch.where(mask, k, 0.0).amax(-1) if k.shape[-1] else k.new_zeros(k.shape[:-1])
            return mask & (worst <= cfg.mask_threshold).unsqueeze(-1)
        if rule == "m2po":
            return m2po_keep(ell, mask, cfg.mask_threshold)
        if rule == "cppo":
            return cppo_keep(log_prob, old_log_prob, ell, advantages, mask, delta=cfg.mask_threshold,
                             w_min=cfg.position_weight_min, delta_b=cfg.prefix_budget)
    raise ValueError(f"mask_rule: unknown mask rule {rule!r}; expected one of {MASK_RULES}")
