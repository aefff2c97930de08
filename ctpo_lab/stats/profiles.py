"""Profiles by position of a batch of trajectories: the drift of L_t, clip rates of any loss preset, the ESS.

Notation: ℓ_t = log π − log μ of the t-th valid token, L_t = Σ_{k≤t} ℓ_k; under μ, E L_t = −Σ_{k≤t} E KL(μ‖π)(s_k).
Clip masks come from :func:`ctpo_lab.losses.compute_policy_loss` (hence :func:`ctpo_lab.clipping.clipped_surrogate`)
and the ESS from :func:`ctpo_lab.diagnostics.normalized_ess`; neither is re-derived here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ctpo_lab import diagnostics, losses
from ctpo_lab.stats.inputs import ArrayLike, check_positive_int, matrix_and_mask, to_numpy
from ctpo_lab.stats.positions import binned_profile, profile_table

__all__ = ["DriftProfile", "drift_profile", "clip_rate_profile", "ess_profile"]


@dataclass(frozen=True)
class DriftProfile:
    """E L_t by position bin against −Σ_{k≤t} KL(μ‖π)(z_k); arrays [num_bins].

    drift_per_token : slope through the origin of the binned mean of L_t on the bin centre (weights = count),
        i.e. the average per-token drift (≈ −KL per token).
    kl_per_token : mean of the supplied per-token KL over valid tokens (NaN without ``kl``).
    """

    bin_center: np.ndarray
    count: np.ndarray
    mean: np.ndarray  #: binned mean of L_t
    neg_cum_kl: np.ndarray  #: binned mean of −Σ_{k≤t} KL_k (NaN without ``kl``)
    drift_per_token: float
    kl_per_token: float
    mean_log_ratio: float  #: mean of ℓ_t over valid tokens (= −KL per token in expectation under μ)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, np.ndarray):
                d[k] = [None if not np.isfinite(e) else float(e) for e in v]
        return d


def drift_profile(
    cum_log_ratio: ArrayLike,
    mask: ArrayLike,
    kl: ArrayLike | None = None,
    *,
    bin_width: int = 50,
    min_count: int = 1,
    max_position: int | None = None,
) -> DriftProfile:
    """Drift of L_t: its binned mean against −Σ KL, and the per-token drift.

    Parameters
    ----------
    cum_log_ratio, mask : [N, T]
        L_t and the valid-token mask.
    kl : [N, T], optional
        Exact per-token KL(μ‖π)(s_t) = Σ_y μ(y|s_t) log(μ/π)(y|s_t) (e.g. from the scorer); its cumulative sum
        over valid tokens is the expected drift given the prefix.
    bin_width, min_count, max_position : binning; bins with < ``min_count`` tokens are NaN and not fitted.
    """
    x, m = matrix_and_mask(cum_log_ratio, mask)
    prof = binned_profile(x, m, bin_width=bin_width)
    table = profile_table(prof, check_positive_int(min_count, "min_count"))
    keep = np.isfinite(table.mean) & (table.count > 0)
    if max_position is not None:
        keep &= table.bin_center <= max_position
    t, y, w = table.bin_center[keep], table.mean[keep], table.count[keep]
    slope = float(np.sum(w * t * y) / np.sum(w * t * t)) if keep.any() else math.nan
    ell = np.diff(np.concatenate([np.zeros((x.shape[0], 1)), x], axis=1), axis=1)
    ell = np.where(m, ell, 0.0)  # recover ℓ_t from L_t (masked-out tokens carry L forward)
    mean_ell = float(ell[m].mean()) if m.any() else math.nan
    neg_cum = np.full_like(table.mean, np.nan)
    kl_tok = math.nan
    if kl is not None:
        k, _ = matrix_and_mask(kl, m, "kl")
        cum = np.cumsum(np.where(m, k, 0.0), axis=1)
        neg_cum = profile_table(binned_profile(-cum, m, bin_width=bin_width), table.min_count).mean
        kl_tok = float(k[m].mean()) if m.any() else math.nan
    return DriftProfile(table.bin_center, table.count, table.mean, neg_cum, slope, kl_tok, mean_ell)


def _clip_masks(
    log_ratio: np.ndarray, mask: np.ndarray, adv: np.ndarray, cfg: losses.LossConfig
) -> np.ndarray:
    lr = torch.from_numpy(log_ratio)
    out = losses.compute_policy_loss(lr, torch.zeros_like(lr), torch.from_numpy(adv), torch.from_numpy(mask), cfg)
    c = out.clip
    return ((c.clipped_high | c.clipped_low | c.clipped_dual) & out.mask).numpy()


def clip_rate_profile(
    log_ratio: ArrayLike,
    mask: ArrayLike,
    advantages: ArrayLike | None = None,
    *,
    window: str | losses.LossConfig = "sqrt_t_window",
    bin_width: int = 50,
) -> diagnostics.PositionProfile:
    """Clip counts by position bin for any loss preset or :class:`~ctpo_lab.losses.LossConfig`.

    The two windows of the paper's Figure 1 are the presets ``fixed_window`` (cumulative ratio, log window
    [−ln 2, ln 5], i.e. w_t = e^{L_t} ∈ [0.5, 5] at every t) and ``sqrt_t_window`` (L_t ∈ [−0.025·√t, 0.05·√t]),
    both without a dual clip and with the log-weight capped at 10.

    The masks come from :func:`ctpo_lab.clipping.clipped_surrogate` via :func:`ctpo_lab.losses.compute_policy_loss`
    (``log_prob = ℓ``, ``old_log_prob = 0``), so the ratio family, clip rule and dual clip of the preset apply.
    A token counts as clipped when it is advantage-aware clipped: A > 0 and log w_t > upper_t, A < 0 and
    log w_t < lower_t, or the dual clip is active.

    Parameters
    ----------
    log_ratio : [N, T]
        Per-token ℓ_t = log π − log μ (not cumulative).
    mask : [N, T]
    advantages : [N] or [N, T], optional
        None: advantage-agnostic "outside the window" rate (above the upper or below the lower bound; the
        union of the A = +1 and A = −1 masks).
    window : str or LossConfig
        A name of :data:`ctpo_lab.losses.PRESETS` (e.g. ``fixed_window``, ``sqrt_t_window``, ``ctpo``) or a
        config (:func:`ctpo_lab.losses.resolve_config` builds one with overrides).

    Returns
    -------
    PositionProfile
        Of L_t (the cumulative sum of ``log_ratio``) with ``clipped`` counts; ``.clip_rate`` per bin.
    """
    x, m = matrix_and_mask(log_ratio, mask, "log_ratio")
    if isinstance(window, str) and window not in losses.PRESETS:
        raise ValueError(f"window: unknown loss preset {window!r}; expected a LossConfig or one of "
                         f"{sorted(losses.PRESETS)}")
    if not isinstance(window, (str, losses.LossConfig)):
        raise TypeError(f"window: expected a preset name or a LossConfig, got {type(window).__name__}")
    cfg = losses.resolve_config(window)
    if advantages is None:
        ones = np.ones(x.shape[0])
        clipped = _clip_masks(x, m, ones, cfg) | _clip_masks(x, m, -ones, cfg)
    else:
        adv = np.asarray(to_numpy(advantages, "advantages"), dtype=np.float64)
        if adv.shape not in ((x.shape[0],), x.shape):
            raise ValueError(f"advantages: expected shape [{x.shape[0]}] or {list(x.shape)}, got {list(adv.shape)}")
        if not np.isfinite(adv if adv.ndim == 1 else adv[m]).all():
            raise ValueError("advantages: NaN or inf value(s)")
        clipped = _clip_masks(x, m, adv, cfg)
    cum = np.cumsum(x, axis=1)
    return binned_profile(cum, m, bin_width=bin_width, clipped=clipped)


def ess_profile(
    cum_log_ratio: ArrayLike, mask: ArrayLike, *, bin_width: int = 50, min_count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ESS (Σ w)² / (n Σ w²) of the cumulative weights w = e^{L_t} in each position bin.

    Uses :func:`ctpo_lab.diagnostics.normalized_ess` (log space, never overflows).

    Returns
    -------
    bin_center : array [num_bins]
    ess : array [num_bins]
        NaN for bins with < ``min_count`` tokens.
    """
    x, m = matrix_and_mask(cum_log_ratio, mask)
    bin_width = check_positive_int(bin_width, "bin_width")
    min_count = check_positive_int(min_count, "min_count")
    pos = np.cumsum(m, axis=1)
    b = np.where(m, (pos - 1) // bin_width, -1)
    n_bins = max(1, -(-x.shape[1] // bin_width))
    xt, bt = torch.from_numpy(x), torch.from_numpy(b)
    ess = np.full(n_bins, np.nan)
    for i in range(n_bins):
        sel = bt == i
        if int(sel.sum()) >= min_count:
            ess[i] = float(diagnostics.normalized_ess(xt, sel))
    centers = np.arange(n_bins) * bin_width + 1 + (bin_width - 1) / 2
    return centers, ess
