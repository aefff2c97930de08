"""Clip rates of every preset on a run's tokens, defined by the loss's own gradient, and clip thresholds
calibrated to a target clip rate.

A valid token with A ≠ 0 is *dropped* by a preset's clip when the gradient of
``losses.compute_policy_loss(..., path="reference")`` with respect to ``log_prob`` is exactly zero there (with
``log_prob = ℓ`` and ``old_log_prob = 0``, so that the ratio is the run's).  This covers every clip rule, the
dual clip, the log-weight cap and any preset added to ``losses.PRESETS`` later without a table of masks;
presets that never drop a gradient (the unclipped weights, CISPO's detached clip) get a clip rate of 0.
The zero pattern is row-local (every ratio family reads one response), so the rows are processed in chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ctpo_lab import losses, stats

__all__ = ["dropped_mask", "clip_rates", "calibrate", "signed_rows", "DEFAULT_TARGET_CLIP_RATE"]

#: Default target of the calibration: 0.2% of the A ≠ 0 tokens (GRPO's clip fraction in community verl runs is
#: ~0.03–0.3% per update; a clip that drops far more discards most of the batch's signal, far less is no clip).
DEFAULT_TARGET_CLIP_RATE = 0.002

_CHUNK_ROWS = 256


def signed_rows(ell: np.ndarray, mask: np.ndarray, adv: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ℓ, mask, A) with A per token; without advantages every row twice, with A = +1 and A = −1."""
    if adv is not None:
        a = np.asarray(adv, dtype=np.float64)
        return ell, mask, (np.broadcast_to(a[:, None], mask.shape) if a.ndim == 1 else a)
    n = mask.shape[0]
    a = np.concatenate([np.ones(n), -np.ones(n)])
    return np.vstack([ell, ell]), np.vstack([mask, mask]), np.broadcast_to(a[:, None], (2 * n, mask.shape[1]))


def dropped_mask(ell: np.ndarray, mask: np.ndarray, adv: np.ndarray, preset: str | losses.LossConfig,
                 **overrides: object) -> np.ndarray:
    """bool [N, T]: valid tokens with A ≠ 0 whose gradient the preset's loss sets to exactly zero.

    ell : float64 [N, T] per-token log-ratios; mask : bool [N, T]; adv : float64 [N, T] (or [N]).
    """
    cfg = losses.resolve_config(preset, **overrides)
    a_all = np.asarray(adv, dtype=np.float64)
    if a_all.ndim == 1:
        a_all = np.broadcast_to(a_all[:, None], mask.shape)
    out = np.zeros(mask.shape, dtype=bool)
    for lo in range(0, mask.shape[0], _CHUNK_ROWS):
        rows = slice(lo, lo + _CHUNK_ROWS)
        m = torch.from_numpy(np.ascontiguousarray(mask[rows]))
        if not bool(m.any()):
            continue
        lp = torch.tensor(np.where(mask[rows], ell[rows], 0.0), dtype=torch.float64, requires_grad=True)
        a = torch.tensor(np.where(mask[rows], a_all[rows], 0.0), dtype=torch.float64)
        res = losses.compute_policy_loss(lp, torch.zeros_like(lp), a, m, cfg, path="reference",
                                         diagnostics="basic")
        if not res.loss.requires_grad:  # nothing depends on log_prob: every token dropped
            grad = torch.zeros_like(lp)
        else:
            (grad,) = torch.autograd.grad(res.loss, lp, allow_unused=True)
            grad = torch.zeros_like(lp) if grad is None else grad
        out[rows] = (m & (a != 0) & (grad == 0)).numpy()
    return out


def _rate(dropped: np.ndarray, active: np.ndarray) -> float:
    return float(dropped.sum() / max(1, int(active.sum())))


def clip_rates(ell: np.ndarray, mask: np.ndarray, adv: np.ndarray | None, presets: Sequence[str], *,
               bin_width: int = 50, min_count: int = 1) -> dict[str, Any]:
    """Clip rate of each preset, overall and by position bin.

    Returns ``{"kind", "overall": {preset: rate or {"positive", "negative"}}, "by_bin": {preset: [rate | None]},
    "bin_center": [...], "active_tokens": int}``; with advantages the denominator is the valid tokens with
    A ≠ 0, without them each sign is reported (every token with A = +1, then with A = −1) and ``by_bin`` pools
    the two signs.
    """
    e2, m2, a2 = signed_rows(ell, mask, adv)
    active = m2 & (a2 != 0)
    cum = np.cumsum(np.where(m2, e2, 0.0), axis=1)
    n = mask.shape[0]
    overall: dict[str, Any] = {}
    by_bin: dict[str, list[float | None]] = {}
    centers: list[float] = []
    for name in presets:
        d = dropped_mask(e2, m2, a2, name)
        if adv is not None:
            overall[name] = _rate(d, active)
        else:
            overall[name] = {"positive": _rate(d[:n], active[:n]), "negative": _rate(d[n:], active[n:])}
        tab = stats.profile_table(stats.binned_profile(cum, active, bin_width=bin_width, clipped=d), min_count)
        centers = tab.bin_center.tolist()
        by_bin[name] = [None if not math.isfinite(x) else float(x) for x in tab.clip_rate.tolist()]
    return {"kind": "advantage-aware" if adv is not None else "per sign of the advantage",
            "overall": overall, "by_bin": by_bin, "bin_center": centers, "active_tokens": int(active.sum())}


def calibrate(ell: np.ndarray, mask: np.ndarray, adv: np.ndarray | None, preset: str, target: float, *,
              max_rows: int = 256, seed: int = 0, iterations: int = 10, **overrides: object) -> dict[str, Any] | None:
    """Scale the preset's window (``eps_low`` and ``eps_high`` by one factor s, other fields kept, ``overrides``
    applied) so that its clip rate on the run is about ``target``; bisection on log s.

    The log window's dual bound (``dual_clip``, log space) is scaled with it.

    Returns ``{"eps_low", "eps_high"[, "dual_clip"], "scale", "clip_rate", "clip_rate_default", "reached"}``
    plus the overrides, or None
    when the preset's clip cannot reach the target (it never drops a gradient, or not enough at its tightest).
    At most ``max_rows`` rows (chosen with ``seed``) are used.
    """
    cfg = losses.resolve_config(preset, **overrides)
    if cfg.clip in ("none", "detached_clip"):
        return None
    rows = np.arange(mask.shape[0])
    if rows.size > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    e2, m2, a2 = signed_rows(ell[rows], mask[rows], None if adv is None else np.asarray(adv)[rows])
    active = m2 & (a2 != 0)

    def fields(s: float) -> dict[str, float]:
        f = {"eps_low": cfg.eps_low * s, "eps_high": cfg.eps_high * s}
        if cfg.clip == "log_window" and cfg.dual_clip is not None:  # the log-space dual bound scales with it
            f["dual_clip"] = cfg.dual_clip * s
        return f

    def rate(s: float) -> float:
        return _rate(dropped_mask(e2, m2, a2, cfg, **fields(s)), active)

    s_hi = (0.999 / cfg.eps_low) if cfg.clip == "ppo" else 1e4  # the PPO window needs eps_low < 1
    s_lo = 1e-4
    default = rate(1.0)
    if rate(s_lo) < target:
        return None
    lo, hi = math.log(s_lo), math.log(s_hi)
    if rate(s_hi) > target:
        lo = hi
    else:
        for _ in range(iterations):  # the rate falls as the window widens
            mid = 0.5 * (lo + hi)
            if rate(math.exp(mid)) > target:
                lo = mid
            else:
                hi = mid
    candidates = {math.exp(lo), math.exp(hi)}  # the rate jumps (whole responses for sequence ratios): the closer
    s = min(candidates, key=lambda c: abs(rate(c) - target))
    achieved = rate(s)
    out = {**fields(s), "scale": s, "clip_rate": achieved, "clip_rate_default": default,
           "reached": bool(achieved <= 1.5 * target)}
    out.update({k: v for k, v in overrides.items()})
    return out
