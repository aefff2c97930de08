"""The one place where batch diagnostics of an importance-weighted policy loss are computed.

Used by :func:`ctpo_lab.losses.policy_loss`, the trainer, the LLM module and the figures. All functions are
device-side (no host synchronisation): they return 0-d tensors, and the caller moves them to the host once.

Metric names follow the conventions users compare across tools (docs/conventions.md §1):

=================================  ===================================================================
``actor/ppo_kl``                   mean over valid tokens of −ℓ_t = log μ_t − log π_t (verl)
``actor/pg_clipfrac``              fraction of valid tokens where the clipped term is active (pg2 > pg1)
``actor/pg_clipfrac_lower``        fraction of valid tokens where the dual clip is active (A < 0)
``clip_ratio/low_mean``            A < 0 and log w_t < lower_t (TRL, advantage-aware)
``clip_ratio/high_mean``           A > 0 and log w_t > upper_t
``clip_ratio/region_mean``         either of the two
``pg_update/clip/{high,low,dual,total}/rate``  CTPO code's advantage-aware clip rates (total = any)
``pg_update/is_ratio/{mean,min,max,p25,p50,p75,p90,p95,p99}``  the weight e^{X_t} before the clip window
``pg_update/log_weight/{mean,min,max}``        X_t itself (before the safety cap), never overflowing
``pg_update/ess/token``            (Σ w)² / (n Σ w²) over valid tokens, computed in log space
``pg_update/ess/sequence``         the same for the full-sequence weights ρ_{1:T} over rows with a token
``pg_update/num_tokens``           number of valid tokens
=================================  ===================================================================

Edge cases of :func:`loss_diagnostics`: an empty batch (B = 0, T = 0 or no valid token) gives 0 for every
metric; finite inputs never give a NaN metric (a weight e^{X_t} beyond the dtype's range saturates at its
largest finite value; the mean weight is computed in log space).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RATIO_QUANTILES",
    "masked_mean",
    "masked_quantiles",
    "normalized_ess",
    "loss_diagnostics",
    "basic_diagnostics",
    "BASIC_METRICS",
    "PositionProfile",
    "position_profile",
]

RATIO_QUANTILES: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def masked_mean(values: Tensor, mask: Tensor, count: Tensor | None = None) -> Tensor:
    """Σ values·mask / max(Σ mask, 1) as a 0-d tensor (0 for an empty mask)."""
    n = mask.count_nonzero() if count is None else count
    return torch.where(mask, values, 0.0).sum() / n.clamp(min=1)


def masked_quantiles(values: Tensor, mask: Tensor, quantiles: tuple[float, ...] = RATIO_QUANTILES) -> Tensor:
    """Linear-interpolation quantiles (numpy's default) of ``values[mask]``.

    Shapes: values, mask [...] → [len(quantiles)]; NaN for an empty mask.  On an accelerator the quantiles
    are read from a device-side sort (masked-out entries sorted to the end as +inf, the index computed from
    the device-side count: no host synchronisation).  On the CPU, where there is no device to synchronise
    with, one multi-selection (``numpy.partition``) replaces the O(n log n) sort.
    """
    if values.device.type == "cpu":
        selected = values.detach()[mask].numpy()
        if selected.size == 0:
            return torch.full((len(quantiles),), math.nan, dtype=values.dtype)
        return _quantiles_of_selected(selected, quantiles)
    flat = torch.where(mask, values, math.inf).flatten()
    n = mask.count_nonzero()
    ordered = flat.sort().values
    q = torch.tensor(quantiles, dtype=values.dtype, device=values.device)
    pos = q * (n - 1).clamp(min=0).to(values.dtype)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=(n - 1).clamp(min=0))
    frac = pos - lo.to(values.dtype)
    v_lo, v_hi = ordered[lo], ordered[hi]
    out = torch.where(frac == 0, v_lo, v_lo + frac * (v_hi - v_lo))  # no inf·0 at the upper neighbour
    return torch.where(n > 0, out, math.nan)


def _quantiles_of_selected(selected: np.ndarray, quantiles: tuple[float, ...],
                           monotone: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """numpy's linear quantiles of f(selected) for a non-decreasing f (``monotone``, a tensor function; identity
    when None) [n] → [len(quantiles)], n ≥ 1: f maps order statistics to order statistics, so only the 2·q
    neighbouring ones are selected (one multi-selection) and mapped."""
    n = selected.size
    pos = np.asarray(quantiles) * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    part = np.partition(selected, np.unique(np.concatenate([lo, hi])))
    v_lo, v_hi = torch.from_numpy(part[lo]), torch.from_numpy(part[hi])
    if monotone is not None:
        v_lo, v_hi = monotone(v_lo), monotone(v_hi)
    frac = torch.from_numpy(pos - lo)  # float64, as numpy interpolates
    between = (v_lo.double() + frac * (v_hi.double() - v_lo.double())).to(v_lo.dtype)
    return torch.where(frac == 0, v_lo, between)  # no inf·0 at the upper neighbour


def _ess_of_values(x: Tensor) -> Tensor:
    """(Σ e^x)² / Σ e^{2x} = exp(2·lse(x) − lse(2x)) of a 1-D tensor of log-weights (−inf entries count as
    absent); the caller divides by n.  Shifted by the max first (exact in exact arithmetic, no float32 loss)."""
    x = x - x.amax().clamp(min=-1e30).detach()
    return (2 * torch.logsumexp(x, 0) - torch.logsumexp(2 * x, 0)).exp()


def normalized_ess(log_weights: Tensor, mask: Tensor) -> Tensor:
    """Normalised effective sample size (Σ w)² / (n Σ w²) ∈ (0, 1], computed as exp(2·lse(X) − lse(2X)) / n.

    Shapes: log_weights, mask [...] → 0-d. Never overflows; 0 for an empty mask.
    """
    x = torch.where(mask, log_weights, -math.inf).flatten()
    x = torch.cat([x, x.new_full((1,), -math.inf)])  # defined for an empty tensor (B = 0 or T = 0)
    n = mask.count_nonzero().to(log_weights.dtype)
    return torch.where(n > 0, _ess_of_values(x) / n.clamp(min=1), 0.0)


#: The metric set of ``diagnostics="basic"`` (what verl's policy losses compute, with verl's definitions).
BASIC_METRICS: tuple[str, ...] = ("actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl")


def basic_diagnostics(
    *, log_ratio_sum: Tensor, num_tokens: Tensor, num_term_active: Tensor, num_dual: Tensor
) -> dict[str, Tensor]:
    """verl's metric set (without ``actor/pg_loss``, which the loss adds), as 0-d device tensors.

    ``log_ratio_sum`` = Σ ℓ_t over valid tokens, ``num_tokens`` = their number, ``num_term_active`` = number of
    valid tokens with pg2 > pg1, ``num_dual`` = number with the dual clip active.  The values are those of
    :func:`loss_diagnostics` for the same names.
    """
    nf = num_tokens.clamp(min=1).to(log_ratio_sum.dtype)
    return {
        "actor/ppo_kl": -log_ratio_sum / nf,
        "actor/pg_clipfrac": num_term_active / nf,
        "actor/pg_clipfrac_lower": num_dual / nf,
    }


def loss_diagnostics(
    *,
    log_ratio: Tensor,
    log_weight_value: Tensor,
    mask: Tensor,
    clipped_high: Tensor,
    clipped_low: Tensor,
    clipped_dual: Tensor,
    clipped_term_active: Tensor,
    max_log_weight: float | None,
) -> dict[str, Tensor]:
    """All scalar diagnostics of one loss evaluation, as 0-d device tensors (see the module table).

    Parameters (all [B, T]; ``mask`` bool)
    ----------
    log_ratio : ℓ_t (clamped, 0 on masked-out tokens)
    log_weight_value : X_t of the ratio family before the safety cap (no gradient needed)
    clipped_* : masks from :class:`ctpo_lab.clipping.ClipOutput`
    max_log_weight : the safety cap applied to X_t before exponentiation (None: no cap)
    """
    lw = log_weight_value.detach()
    n = mask.count_nonzero()
    nf = n.clamp(min=1).to(lw.dtype)
    high = clipped_high & mask
    low = clipped_low & mask
    dual = clipped_dual & mask
    region = high | low
    rate_high = high.count_nonzero() / nf
    rate_low = low.count_nonzero() / nf
    rate_dual = dual.count_nonzero() / nf
    log_ratio_valid = torch.where(mask, log_ratio.detach(), 0.0)
    out = {
        "actor/ppo_kl": -log_ratio_valid.sum() / nf,
        "actor/pg_clipfrac": (clipped_term_active & mask).count_nonzero() / nf,
        "actor/pg_clipfrac_lower": rate_dual,
        "clip_ratio/low_mean": rate_low,
        "clip_ratio/high_mean": rate_high,
        "clip_ratio/region_mean": region.count_nonzero() / nf,
        "pg_update/clip/high/rate": rate_high,
        "pg_update/clip/low/rate": rate_low,
        "pg_update/clip/dual/rate": rate_dual,
        "pg_update/clip/total/rate": (region | dual).count_nonzero() / nf,
    }
    values = _weight_statistics_of_selected(lw, mask, nf, max_log_weight)
    if values is None:
        values = _weight_statistics(lw, mask, n, nf, max_log_weight)
    out.update(values)
    out["pg_update/ess/sequence"] = normalized_ess(log_ratio_valid.sum(-1), mask.any(-1))
    out["pg_update/num_tokens"] = n.to(lw.dtype)
    return out


def _weight_statistics(lw: Tensor, mask: Tensor, n: Tensor, nf: Tensor, max_log_weight: float | None
                       ) -> dict[str, Tensor]:
    """The statistics of X_t and e^{X_t} over valid tokens, device-side ([B, T] masked reductions)."""
    capped = lw if max_log_weight is None else lw.clamp(max=max_log_weight)
    weight = capped.exp().clamp(max=torch.finfo(lw.dtype).max)  # saturates instead of inf (no inf − inf = NaN)
    inf = torch.tensor(math.inf, dtype=lw.dtype, device=lw.device)
    nonempty = n > 0

    def extreme(x: Tensor, fill: Tensor, largest: bool) -> Tensor:  # 0 for an empty batch, any shape
        x = torch.cat([x.flatten(), fill.reshape(1)])
        return torch.where(nonempty, x.amax() if largest else x.amin(), 0.0)

    mean_weight = (torch.logsumexp(torch.cat([torch.where(mask, capped, -inf).flatten(), -inf.reshape(1)]), 0)
                   - nf.log()).exp()  # in log space: no overflow to inf; 0 for an empty batch
    out = {
        "pg_update/is_ratio/mean": mean_weight.clamp(max=torch.finfo(lw.dtype).max),
        "pg_update/is_ratio/min": extreme(torch.where(mask, weight, inf), inf, False),
        "pg_update/is_ratio/max": extreme(torch.where(mask, weight, -inf), -inf, True),
        "pg_update/log_weight/mean": torch.where(mask, lw, 0.0).sum() / nf,
        "pg_update/log_weight/min": extreme(torch.where(mask, lw, inf), inf, False),
        "pg_update/log_weight/max": extreme(torch.where(mask, lw, -inf), -inf, True),
        "pg_update/ess/token": normalized_ess(capped, mask),
    }
    for q, v in zip(RATIO_QUANTILES, masked_quantiles(weight, mask).unbind(0)):
        out[f"pg_update/is_ratio/p{round(q * 100)}"] = torch.where(nonempty, v, 0.0)
    return out


def _weight_statistics_of_selected(lw: Tensor, mask: Tensor, nf: Tensor, max_log_weight: float | None
                                   ) -> dict[str, Tensor] | None:
    """The values of :func:`_weight_statistics` from the valid tokens selected once (on the CPU only, where the
    selection needs no host synchronisation): every statistic is then a reduction over n values instead of a
    masked one over [B, T], and the weights e^{X_t} are formed only at the order statistics the quantiles need
    (e^x and the saturation are non-decreasing).  None (use the masked path) off the CPU, for other dtypes, an
    empty batch or a non-finite X_t."""
    if (lw.device.type != "cpu" or lw.dtype not in (torch.float32, torch.float64) or mask.dtype != torch.bool
            or mask.device.type != "cpu"):
        return None
    selected = torch.from_numpy(lw.numpy()[mask.numpy()])  # numpy's boolean selection: ≈ 1/15 of torch's here
    if selected.numel() == 0:
        return None
    lw_min, lw_max = torch.aminmax(selected)  # NaN if any value is: all are finite iff both extremes are
    if not (math.isfinite(lw_min.item()) and math.isfinite(lw_max.item())):
        return None
    capped = selected if max_log_weight is None else selected.clamp(max=max_log_weight)
    largest = torch.finfo(lw.dtype).max

    def weight(x: Tensor) -> Tensor:  # saturates instead of inf
        return x.exp().clamp(max=largest)

    capped_min, capped_max = torch.aminmax(capped)
    out = {
        "pg_update/is_ratio/mean": (torch.logsumexp(capped, 0) - nf.log()).exp().clamp(max=largest),
        "pg_update/is_ratio/min": weight(capped_min),
        "pg_update/is_ratio/max": weight(capped_max),
        "pg_update/log_weight/mean": selected.sum() / nf,
        "pg_update/log_weight/min": lw_min,
        "pg_update/log_weight/max": lw_max,
        "pg_update/ess/token": _ess_of_values(capped) / nf,
    }
    for q, v in zip(RATIO_QUANTILES, _quantiles_of_selected(capped.numpy(), RATIO_QUANTILES, weight).unbind(0)):
        out[f"pg_update/is_ratio/p{round(q * 100)}"] = v
    return out


@dataclass(frozen=True)
class PositionProfile:
    """Per-position-bin sufficient statistics of L_t (and optional clip masks), summable across batches.

    Bin b covers positions t ∈ [b·w + 1, (b+1)·w] (1-based valid-token positions).  All arrays [num_bins].
    """

    bin_width: int
    count: Tensor  #: number of valid tokens in the bin
    sum: Tensor  #: Σ L_t
    sum_sq: Tensor  #: Σ L_t²
    clipped: Tensor | None = None  #: number of clipped tokens (advantage-aware), if masks were given

    @property
    def bin_start(self) -> Tensor:
        return torch.arange(self.count.numel(), device=self.count.device) * self.bin_width + 1

    @property
    def bin_center(self) -> Tensor:
        return self.bin_start.to(self.sum.dtype) + (self.bin_width - 1) / 2

    @property
    def mean(self) -> Tensor:
        return self.sum / self.count.clamp(min=1)

    @property
    def std(self) -> Tensor:
        """Population std of L_t in each bin (NaN where the bin is empty)."""
        c = self.count.to(self.sum.dtype)
        var = (self.sum_sq / c.clamp(min=1) - self.mean**2).clamp(min=0)
        return torch.where(c > 0, var.sqrt(), math.nan)

    @property
    def clip_rate(self) -> Tensor | None:
        if self.clipped is None:
            return None
        c = self.count.to(self.sum.dtype)
        return torch.where(c > 0, self.clipped.to(c.dtype) / c.clamp(min=1), math.nan)

    def __add__(self, other: PositionProfile) -> PositionProfile:
        if other.bin_width != self.bin_width:
            raise ValueError("other: bin widths differ")
        n = max(self.count.numel(), other.count.numel())

        def pad(x: Tensor | None) -> Tensor | None:
            return None if x is None else torch.nn.functional.pad(x, (0, n - x.numel()))

        clipped = None
        if self.clipped is not None and other.clipped is not None:
            clipped = pad(self.clipped) + pad(other.clipped)
        return PositionProfile(
            self.bin_width,
            pad(self.count) + pad(other.count),
            pad(self.sum) + pad(other.sum),
            pad(self.sum_sq) + pad(other.sum_sq),
            clipped,
        )


def position_profile(
    cum_log_ratio: Tensor, mask: Tensor, bin_width: int = 50, clipped: Tensor | None = None
) -> PositionProfile:
    """Bin valid tokens by position t and accumulate count, Σ L_t, Σ L_t² (and clipped counts).

    Parameters
    ----------
    cum_log_ratio : Tensor [B, T]
        L_t (see :func:`ctpo_lab.ratios.cumulative_log_ratio`).
    mask : Tensor [B, T]
        Valid-token mask.
    bin_width : int
        Positions per bin (the paper's Figure 1 uses 50).
    clipped : Tensor [B, T] bool, optional
        Advantage-aware clip indicator per token (e.g. ``high | low | dual`` of a ClipOutput).
    """
    if not isinstance(bin_width, int) or bin_width < 1:
        raise ValueError(f"bin_width: expected a positive int, got {bin_width!r}")
    valid = mask.bool()
    num_bins = max(1, -(-cum_log_ratio.shape[-1] // bin_width))
    t = valid.to(torch.int64).cumsum(-1)
    idx = ((t - 1).clamp(min=0) // bin_width).flatten()
    x = torch.where(valid, cum_log_ratio.detach(), 0.0).flatten()
    w = valid.to(x.dtype).flatten()
    zeros = torch.zeros(num_bins, dtype=x.dtype, device=x.device)
    count = zeros.index_add(0, idx, w)
    s = zeros.index_add(0, idx, x)
    s2 = zeros.index_add(0, idx, x * x)
    clip_counts = None
    if clipped is not None:
        clip_counts = zeros.index_add(0, idx, (clipped & valid).to(x.dtype).flatten())
    return PositionProfile(bin_width, count, s, s2, clip_counts)
