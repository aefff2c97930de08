"""Figure-1 statistics of a batch of trajectories, from any producer (real LLM, trainer dumps, simulations).

One function, :func:`trajectory_statistics`, turns per-token log-ratios into every number the paper's Figure 1
and the README report: the fixed-exponent σ̂ (weighted least squares through the origin, the paper's fit), the
free exponent with a cluster-bootstrap CI (pooled and centred within prompt groups), the drift E L_t against
−Σ KL, advantage-aware clip rates by position for any loss presets (by default the Figure-1 windows, the presets
``fixed_window``, w_t = e^{L_t} ∈ [0.5, 5], and ``sqrt_t_window``, L_t ∈ [−0.025·√t, 0.05·√t]), and the ESS by
position.  All the statistics themselves live in :mod:`ctpo_lab.stats`; this module only assembles them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ctpo_lab import losses, stats

__all__ = ["trajectory_statistics", "finite_or_none"]


def finite_or_none(x: Any) -> float | None:
    """``float(x)`` when it is a finite number, else None (JSON-ready)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _list(a: Any) -> list[float | None]:
    return [finite_or_none(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


def trajectory_statistics(
    log_ratio: np.ndarray,
    mask: np.ndarray,
    advantages: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    kl: np.ndarray | None = None,
    *,
    bin_width: int = 50,
    min_count: int = 30,
    min_sequences: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    windows: Sequence[str | losses.LossConfig] = losses.FIGURE1_WINDOWS,
) -> dict[str, Any]:
    """All Figure-1 statistics of one batch of trajectories, as a JSON-ready dict.

    Parameters
    ----------
    log_ratio : array [N, T]
        Per-token ℓ_t = log π − log μ (0 or anything on masked-out tokens).
    mask : array [N, T] bool
        Valid tokens.
    advantages : array [N] or [N, T], optional
        For advantage-aware clip rates; without them the "outside the window" rate is reported.
    groups : array [N], optional
        Prompt-group id per row: enables the group-cluster bootstrap and the within-group centring.
    kl : array [N, T], optional
        Exact per-token KL(μ‖π) at each prefix, for the drift comparison E L_t vs −Σ KL.
    bin_width, min_count, min_sequences, n_boot, seed
        Binning and bootstrap settings of :func:`ctpo_lab.stats.sqrt_t_fit`.
    windows : sequence of preset names or LossConfigs
        The clip windows of ``clip_rates`` (:func:`ctpo_lab.stats.clip_rate_profile`), keyed by their config's
        ``name``; default the two Figure-1 presets ``fixed_window`` and ``sqrt_t_window``.

    Returns
    -------
    dict
        ``sigma_hat``, ``sigma_hat_ci``, ``exponent``, ``exponent_ci``, ``exponent_contains_0.5``, ``centered``
        (the same after centring within groups, when ``groups`` has ≥ 2 groups), ``drift_per_token``,
        ``kl_per_token``, ``clip_rates`` {window: {"overall", "by_bin"}} (advantage-aware, plus
        ``<window>_outside``), per-bin arrays (``bin_center``, ``bin_std``, ``bin_count``, ``bin_mean``,
        ``bin_neg_cum_kl``, ``ess_by_bin``), the free-fit curve (``prefactor``, ``grid_t``, ``grid_sd``) and sizes.
    """
    mask = np.asarray(mask, dtype=bool)
    ell = np.where(mask, np.asarray(log_ratio, dtype=np.float64), 0.0)
    cum = np.cumsum(ell, axis=1)
    fit = stats.sqrt_t_fit(cum, mask, groups, cluster="sequence", bin_width=bin_width, min_count=min_count,
                           min_sequences=min_sequences, n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {
        "sigma_hat": fit.sigma_hat, "sigma_hat_ci": list(fit.sigma_hat_ci),
        "exponent": fit.exponent, "exponent_ci": list(fit.exponent_ci),
        "exponent_contains_0.5": bool(fit.contains(0.5)), "cluster": fit.cluster,
    }
    if groups is not None and len(np.unique(groups)) >= 2:
        try:
            fit_c = stats.sqrt_t_fit(cum, mask, groups, center=True, bin_width=bin_width, min_count=min_count,
                                     min_sequences=min_sequences, n_boot=n_boot, seed=seed)
            out["centered"] = {"sigma_hat": fit_c.sigma_hat, "sigma_hat_ci": list(fit_c.sigma_hat_ci),
                               "exponent": fit_c.exponent, "exponent_ci": list(fit_c.exponent_ci)}
        except ValueError as e:  # too few groups with enough tokens: reported, not fatal
            out["centered"] = {"error": str(e)}
    drift = stats.drift_profile(cum, mask, kl, bin_width=bin_width, min_count=min_count)
    clip: dict[str, Any] = {}
    for window in windows:
        name = window.name if isinstance(window, losses.LossConfig) else window
        if name in clip:
            raise ValueError(f"windows: two windows named {name!r}")
        variants = [(True, name), (False, f"{name}_outside")] if advantages is not None else [(False, name)]
        for aware, key in variants:
            prof = stats.clip_rate_profile(ell, mask, advantages if aware else None, window=window,
                                           bin_width=bin_width)
            tab = stats.profile_table(prof, min_count)
            clip[key] = {"overall": float(prof.clipped.sum() / max(float(prof.count.sum()), 1.0)),
                         "by_bin": _list(tab.clip_rate)}
    centers, ess = stats.ess_profile(cum, mask, bin_width=bin_width, min_count=min_count)
    out.update({
        "drift_per_token": drift.drift_per_token, "kl_per_token": finite_or_none(drift.kl_per_token),
        "mean_log_ratio": drift.mean_log_ratio, "clip_rates": clip,
        "bin_center": _list(fit.bin_center), "bin_std": _list(fit.bin_std), "bin_count": _list(fit.bin_count),
        "bin_mean": _list(drift.mean), "bin_neg_cum_kl": _list(drift.neg_cum_kl),
        "grid_t": _list(fit.grid_t), "grid_sd": _list(fit.grid_sd), "prefactor": fit.prefactor,
        "ess_by_bin": _list(ess), "ess_bin_center": _list(centers),
        "n_sequences": fit.n_sequences, "n_clusters": fit.n_clusters,
        "max_abs_log_ratio": float(np.abs(ell).max()) if ell.size else 0.0,
    })
    return out
