"""Statistics over collections of trajectories and runs: the √t law, drift, clip and ESS profiles, bootstrap CIs.

Everything here consumes log-ratios produced elsewhere (the Markov lab, the LLM module, the trainer) and
returns NumPy results; per-batch quantities are computed by :mod:`ctpo_lab.diagnostics` (position bins, ESS)
and clip masks by :func:`ctpo_lab.clipping.clipped_surrogate` (through :func:`ctpo_lab.losses.compute_policy_loss`),
never re-derived here.

Notation (docs/theory.md §1 and §5): ℓ_t per-token log-ratio, L_t = Σ_{k≤t} ℓ_k over valid tokens, t the 1-based
valid-token position.  Under μ, L_t = M_t − K_t (martingale + drift), E L_t = −Σ_{k≤t} E KL(μ‖π)(z_k).

Public API
----------
* :func:`sqrt_t_fit` — the paper's fixed-exponent fit σ̂ (WLS through the origin, weights √count, bins of 50)
  and a free-exponent log-log slope with a cluster-bootstrap CI → :class:`SqrtTFit`.
* :func:`binned_profile`, :func:`profile_table`, :func:`center_within_groups`, :func:`fixed_exponent_sigma`.
* :func:`drift_profile` — E L_t by position against −Σ KL → :class:`DriftProfile`.
* :func:`clip_rate_profile` — advantage-aware clip rate by position for a named window or a loss preset.
* :func:`ess_profile` — normalised ESS of the cumulative weights e^{L_t} by position bin.
* :func:`bootstrap_ci`, :func:`curve_bands`, :func:`iqm` — generic CIs over seeds/runs (mean with a percentile
  bootstrap; IQM with a stratified bootstrap, as rliable).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ctpo_lab import diagnostics, losses

__all__ = [
    "WINDOWS",
    "BootstrapCI",
    "CurveBands",
    "PositionTable",
    "SqrtTFit",
    "DriftProfile",
    "iqm",
    "bootstrap_ci",
    "curve_bands",
    "center_within_groups",
    "binned_profile",
    "profile_table",
    "fixed_exponent_sigma",
    "sqrt_t_fit",
    "drift_profile",
    "window_config",
    "clip_rate_profile",
    "ess_profile",
]

ArrayLike = Tensor | np.ndarray | Sequence[Any]

#: Named clip windows of Figure 1 (bottom), as overrides of the ``ctpo`` preset (rule ``log_window``, no dual
#: clip): the fixed ratio window w ∈ [0.5, 5] (log bounds [−ln 2, ln 5], exponent 0) and the √t window
#: [−0.025·√t, 0.05·√t].
WINDOWS: dict[str, dict[str, Any]] = {
    "fixed_window": dict(eps_low=math.log(2.0), eps_high=math.log(5.0), clip_exponent=0.0, dual_clip=None),
    "sqrt_t_window": dict(eps_low=0.025, eps_high=0.05, clip_exponent=0.5, dual_clip=None),
}


# ----------------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------------


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, (np.ndarray, list, tuple)):
        return np.asarray(x)
    raise TypeError(f"{name}: expected a torch.Tensor, numpy array or sequence, got {type(x).__name__}")


def _matrix_and_mask(values: ArrayLike, mask: ArrayLike, name: str = "cum_log_ratio") -> tuple[np.ndarray, np.ndarray]:
    """float64 [N, T] values and bool [N, T] mask; NaN/inf on valid tokens raise."""
    x = _to_numpy(values, name)
    m = _to_numpy(mask, "mask")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected shape [N, T], got {x.shape}")
    if m.shape != x.shape:
        raise ValueError(f"mask: shape {m.shape} does not match {name} {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name}: expected a real-valued array, got dtype {x.dtype}")
    if m.dtype != bool:
        if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
            raise TypeError(f"mask: expected bool or 0/1 values, got dtype {m.dtype}")
        if not np.isin(m, (0, 1)).all():
            raise ValueError("mask: expected only 0/1 values")
        m = m.astype(bool)
    x = x.astype(np.float64)
    bad = int((~np.isfinite(x) & m).sum())
    if bad:
        raise ValueError(f"{name}: {bad} NaN or inf value(s) on valid tokens")
    return np.where(m, x, 0.0), m


def _groups(groups: ArrayLike | None, n: int, name: str = "groups") -> np.ndarray | None:
    if groups is None:
        return None
    g = _to_numpy(groups, name).reshape(-1)
    if g.shape[0] != n:
        raise ValueError(f"{name}: expected {n} entries (one per row), got {g.shape[0]}")
    _, inv = np.unique(g, return_inverse=True)
    return inv.astype(np.int64)


def _check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int ≥ {minimum}, got {value!r}")
    return int(value)


def _check_confidence(confidence: float) -> float:
    if not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    return float(confidence)


def _compact(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-index each row by valid-token position: out[i, t−1] = value at the t-th valid token ([N, T_max])."""
    pos = np.cumsum(mask, axis=1)
    t_max = int(pos[:, -1].max()) if pos.size else 0
    out = np.zeros((values.shape[0], max(t_max, 1)))
    alive = np.zeros_like(out, dtype=bool)
    rows, cols = np.nonzero(mask)
    out[rows, pos[rows, cols] - 1] = values[rows, cols]
    alive[rows, pos[rows, cols] - 1] = True
    return out, alive


# ----------------------------------------------------------------------------------------------------------
# generic bootstrap CIs (seeds, runs)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapCI:
    """A point estimate with a bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    method: str  #: e.g. "mean/percentile" or "iqm/stratified"
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CurveBands:
    """Point-wise estimate and bootstrap band of a family of curves; arrays [P]."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    confidence: float
    method: str
    n_boot: int
    x: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("estimate", "low", "high", "x"):
            d[k] = None if d[k] is None else np.asarray(d[k]).tolist()
        return d


def iqm(values: ArrayLike, axis: int | None = None) -> np.ndarray | float:
    """Interquartile mean: the mean of the middle 50% of the values (scipy ``trim_mean(·, 0.25)``).

    ``axis=None`` pools every value (rliable's IQM over runs × tasks). NaN values are not allowed.
    """
    from scipy.stats import trim_mean

    x = np.asarray(_to_numpy(values, "values"), dtype=np.float64)
    if x.size == 0:
        raise ValueError("values: empty")
    if axis is None:
        return float(trim_mean(x.reshape(-1), 0.25))
    return trim_mean(x, 0.25, axis=axis)


def _stat_fn(statistic: str | Callable[[np.ndarray], float]) -> tuple[str, Callable[[np.ndarray, int], Any]]:
    """(name, f(sample, axis)) where f reduces over the run axis (and tasks, for IQM pooled per replicate)."""
    if callable(statistic):
        return getattr(statistic, "__name__", "custom"), lambda x, axis: np.apply_along_axis(
            statistic, axis, x
        )
    if statistic == "mean":
        return "mean", lambda x, axis: np.nanmean(x, axis=axis)
    if statistic == "median":
        return "median", lambda x, axis: np.nanmedian(x, axis=axis)
    if statistic == "iqm":
        from scipy.stats import trim_mean

        return "iqm", lambda x, axis: trim_mean(x, 0.25, axis=axis)
    raise ValueError(f"statistic: expected 'mean', 'median', 'iqm' or a callable, got {statistic!r}")


def _resample_rows(x: np.ndarray, n_boot: int, rng: np.random.Generator, stratified: bool) -> np.ndarray:
    """[n_boot, n_runs, ...] bootstrap replicates of x [n_runs, ...]; stratified: columns (tasks, axis 1)
    resampled independently (rliable's stratified bootstrap)."""
    n = x.shape[0]
    if stratified and x.ndim >= 2:
        idx = rng.integers(0, n, size=(n_boot, n, x.shape[1]))  # one row draw per (replicate, run, task)
        idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
        idx = np.broadcast_to(idx, (n_boot,) + x.shape)
        return np.take_along_axis(np.broadcast_to(x, (n_boot,) + x.shape), idx, axis=1)
    idx = rng.integers(0, n, size=(n_boot, n))
    return x[idx]


def bootstrap_ci(
    values: ArrayLike,
    *,
    statistic: str | Callable[[np.ndarray], float] = "mean",
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap CI of a statistic over runs (seeds).

    Parameters
    ----------
    values : array [n_runs] or [n_runs, n_tasks]
        One score per run (and task). Runs are the resampling unit.
    statistic : {"mean", "median", "iqm"} or callable
        ``mean``/``median``: of all values of the replicate (NaN ignored).  ``iqm``: interquartile mean of all
        runs × tasks scores, with a *stratified* bootstrap (runs resampled independently within each task, as
        rliable).  A callable maps a 1-D array of run scores to a float (1-D ``values`` only).
    confidence : float in (0, 1)
    n_boot : int
        Bootstrap replicates.
    seed : int
        Seed of the resampling (same seed → same interval).

    Returns
    -------
    BootstrapCI
        estimate = statistic of the data; (low, high) = the (α/2, 1 − α/2) percentiles of the replicates.
    """
    x = np.asarray(_to_numpy(values, "values"), dtype=np.float64)
    if x.ndim not in (1, 2):
        raise ValueError(f"values: expected shape [n_runs] or [n_runs, n_tasks], got {x.shape}")
    if x.shape[0] < 1 or x.size == 0:
        raise ValueError("values: empty")
    if np.isinf(x).any():
        raise ValueError("values: inf value(s)")
    if callable(statistic) and x.ndim != 1:
        raise ValueError("statistic: a callable statistic needs 1-D values")
    if statistic == "iqm" and np.isnan(x).any():
        raise ValueError("values: NaN value(s) are not allowed with statistic='iqm'")
    confidence = _check_confidence(confidence)
    n_boot = _check_positive_int(n_boot, "n_boot")
    name, f = _stat_fn(statistic)
    rng = np.random.default_rng(seed)
    stratified = name == "iqm" and x.ndim == 2
    flat = x.reshape(x.shape[0], -1)
    est = float(f(flat.reshape(1, -1), 1)[0])
    reps = _resample_rows(x, n_boot, rng, stratified).reshape(n_boot, -1)
    boot = np.asarray(f(reps, 1), dtype=np.float64)
    alpha = 1.0 - confidence
    lo, hi = np.nanpercentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    method = f"{name}/{'stratified' if stratified else 'percentile'}"
    return BootstrapCI(est, float(lo), float(hi), confidence, method, n_boot)


def curve_bands(
    curves: ArrayLike,
    *,
    x: ArrayLike | None = None,
    statistic: str = "mean",
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> CurveBands:
    """Point-wise bootstrap bands of a family of curves (one curve per run/seed).

    Parameters
    ----------
    curves : array [n_runs, P] or [n_runs, n_tasks, P]
        Curve values at P common points (e.g. training steps or positions). NaN (a run that has no value at a
        point) is ignored by ``mean``/``median``.
    x : array [P], optional
        The abscissa, stored with the result.
    statistic : {"mean", "median", "iqm"}
        ``iqm`` pools runs × tasks at each point with a stratified bootstrap over runs within tasks.
    confidence, n_boot, seed : see :func:`bootstrap_ci`.

    Returns
    -------
    CurveBands
        estimate, low, high: arrays [P].
    """
    c = np.asarray(_to_numpy(curves, "curves"), dtype=np.float64)
    if c.ndim not in (2, 3):
        raise ValueError(f"curves: expected shape [n_runs, P] or [n_runs, n_tasks, P], got {c.shape}")
    if c.shape[0] < 1 or c.shape[-1] < 1:
        raise ValueError(f"curves: empty, shape {c.shape}")
    if np.isinf(c).any():
        raise ValueError("curves: inf value(s)")
    if statistic == "iqm" and np.isnan(c).any():
        raise ValueError("curves: NaN value(s) are not allowed with statistic='iqm'")
    if not isinstance(statistic, str):
        raise TypeError("statistic: curve_bands takes 'mean', 'median' or 'iqm'")
    confidence = _check_confidence(confidence)
    n_boot = _check_positive_int(n_boot, "n_boot")
    xs = None
    if x is not None:
        xs = np.asarray(_to_numpy(x, "x"), dtype=np.float64).reshape(-1)
        if xs.shape[0] != c.shape[-1]:
            raise ValueError(f"x: expected {c.shape[-1]} points, got {xs.shape[0]}")
    name, f = _stat_fn(statistic)
    rng = np.random.default_rng(seed)
    stratified = name == "iqm" and c.ndim == 3
    P = c.shape[-1]
    pooled = c.reshape(-1, P)  # [n_runs·n_tasks, P]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN points give NaN, on purpose
        est = np.asarray(f(pooled, 0), dtype=np.float64)
        reps = _resample_rows(c, n_boot, rng, stratified).reshape(n_boot, -1, P)
        boot = np.asarray(f(reps, 1), dtype=np.float64)  # [n_boot, P]
        alpha = 1.0 - confidence
        lo, hi = np.nanpercentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    method = f"{name}/{'stratified' if stratified else 'percentile'}"
    return CurveBands(est, lo, hi, confidence, method, n_boot, xs)


# ----------------------------------------------------------------------------------------------------------
# position profiles
# ----------------------------------------------------------------------------------------------------------


def _center(x: np.ndarray, m: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L − group mean at t, number of group members alive at t) per token, both [N, T]."""
    pos = np.cumsum(m, axis=1)
    rows, cols = np.nonzero(m)
    key_g, key_t = g[rows], pos[rows, cols] - 1
    n_g, t_max = int(g.max()) + 1, max(int(pos.max()) if pos.size else 0, 1)
    s = np.zeros((n_g, t_max))
    n = np.zeros((n_g, t_max))
    np.add.at(s, (key_g, key_t), x[rows, cols])
    np.add.at(n, (key_g, key_t), 1.0)
    out = np.zeros_like(x)
    count = np.zeros_like(x)
    out[rows, cols] = x[rows, cols] - s[key_g, key_t] / n[key_g, key_t]
    count[rows, cols] = n[key_g, key_t]
    return out, count


def center_within_groups(cum_log_ratio: ArrayLike, mask: ArrayLike, groups: ArrayLike) -> np.ndarray:
    """L_t minus the mean of L_t over the members of the same group alive at position t.

    Pooling heterogeneous prompts inflates Var(L_t) by the between-prompt spread of the drift (docs/theory.md §5);
    centring within prompt groups removes it.  Shapes: cum_log_ratio, mask [N, T], groups [N] → [N, T]
    (0 on masked-out tokens; a group member alone at t gets 0).  The centred values have variance
    σ²·(n−1)/n for n members alive; :func:`sqrt_t_fit` corrects for that.
    """
    x, m = _matrix_and_mask(cum_log_ratio, mask)
    g = _groups(groups, x.shape[0])
    assert g is not None
    return _center(x, m, g)[0]


def binned_profile(
    cum_log_ratio: ArrayLike,
    mask: ArrayLike,
    *,
    bin_width: int = 50,
    clipped: ArrayLike | None = None,
    groups: ArrayLike | None = None,
    center: bool = False,
) -> diagnostics.PositionProfile:
    """:func:`ctpo_lab.diagnostics.position_profile` on arrays or tensors, optionally centred within groups.

    Returns a float64 :class:`~ctpo_lab.diagnostics.PositionProfile` (summable across batches with ``+``).
    """
    x, m = _matrix_and_mask(cum_log_ratio, mask)
    if center:
        if groups is None:
            raise ValueError("groups: center=True needs groups (one prompt-group id per row)")
        x = center_within_groups(x, m, groups)
    clip_t = None
    if clipped is not None:
        c = _to_numpy(clipped, "clipped")
        if c.shape != x.shape:
            raise ValueError(f"clipped: shape {c.shape} does not match {x.shape}")
        clip_t = torch.from_numpy(c.astype(bool))
    return diagnostics.position_profile(torch.from_numpy(x), torch.from_numpy(m), bin_width, clip_t)


@dataclass(frozen=True)
class PositionTable:
    """NumPy view of a :class:`~ctpo_lab.diagnostics.PositionProfile`; every array [num_bins].

    Bins with fewer than ``min_count`` tokens have NaN mean/std/clip_rate.
    """

    bin_start: np.ndarray
    bin_center: np.ndarray
    count: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    clip_rate: np.ndarray | None
    bin_width: int
    min_count: int

    def to_dict(self) -> dict[str, Any]:
        d = {k: (None if v is None else np.asarray(v).tolist()) for k, v in asdict(self).items()
             if isinstance(v, np.ndarray) or v is None}
        d["bin_width"], d["min_count"] = self.bin_width, self.min_count
        return d


def profile_table(profile: diagnostics.PositionProfile, min_count: int = 1) -> PositionTable:
    """Convert a position profile to NumPy, masking bins with fewer than ``min_count`` tokens."""
    if not isinstance(profile, diagnostics.PositionProfile):
        raise TypeError(f"profile: expected a PositionProfile, got {type(profile).__name__}")
    min_count = _check_positive_int(min_count, "min_count")
    count = profile.count.detach().cpu().numpy().astype(np.float64)
    keep = count >= min_count

    def arr(t: Tensor | None) -> np.ndarray | None:
        if t is None:
            return None
        a = t.detach().cpu().numpy().astype(np.float64)
        return np.where(keep, a, np.nan)

    return PositionTable(
        bin_start=profile.bin_start.cpu().numpy(),
        bin_center=profile.bin_center.cpu().numpy().astype(np.float64),
        count=count,
        mean=arr(profile.mean),  # type: ignore[arg-type]
        std=arr(profile.std),  # type: ignore[arg-type]
        clip_rate=arr(profile.clip_rate),
        bin_width=profile.bin_width,
        min_count=min_count,
    )


def _wls_origin(t: np.ndarray, y: np.ndarray, w: np.ndarray, exponent: float) -> float:
    """argmin_σ Σ w (y − σ t^p)² = Σ w t^p y / Σ w t^{2p}."""
    tp = t**exponent
    den = float(np.sum(w * tp * tp))
    return float(np.sum(w * tp * y) / den) if den > 0 else math.nan


def fixed_exponent_sigma(
    profile: diagnostics.PositionProfile | PositionTable,
    *,
    exponent: float = 0.5,
    min_count: int = 30,
    max_position: int | None = 5000,
) -> float:
    """The paper's fixed-exponent fit: σ̂ = Σ_b w_b t_b^p y_b / Σ_b w_b t_b^{2p}.

    y_b = std of L_t in bin b, t_b the bin centre, w_b = √count_b; bins with < ``min_count`` tokens or a centre
    beyond ``max_position`` are dropped (Figure 1: bins of 50, ≥ 30 tokens, positions ≤ 5000, p = 0.5).
    Returns NaN when no bin qualifies.
    """
    table = profile if isinstance(profile, PositionTable) else profile_table(profile, 1)
    keep = table.count >= min_count
    if max_position is not None:
        keep &= table.bin_center <= max_position
    if not keep.any():
        return math.nan
    return _wls_origin(table.bin_center[keep], table.std[keep], np.sqrt(table.count[keep]), exponent)


# ----------------------------------------------------------------------------------------------------------
# the √t fit
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SqrtTFit:
    """Result of :func:`sqrt_t_fit`.

    sigma_hat : the paper's σ̂ (sd(L_t) ≈ σ̂·t^fixed_exponent), WLS through the origin on binned stds.
    sigma_hat_ci : cluster-bootstrap percentile CI of σ̂.
    exponent : free log-log slope β of sd(L_t) ≈ c·t^β on the log-spaced position grid.
    exponent_ci : cluster-bootstrap percentile CI (low, high) of β.
    prefactor : c of the free fit.
    grid_t, grid_sd, grid_count : the grid positions, sd(L_t) there (ddof 1; pooled within groups when centred)
        and the number of sequences alive there.
    bin_center, bin_std, bin_count : the binned profile used for σ̂ (bins with < min_count tokens are NaN).
    """

    sigma_hat: float
    sigma_hat_ci: tuple[float, float]
    exponent: float
    exponent_ci: tuple[float, float]
    prefactor: float
    fixed_exponent: float
    confidence: float
    n_boot: int
    n_sequences: int
    n_clusters: int
    cluster: str
    centered: bool
    grid_t: np.ndarray = field(repr=False)
    grid_sd: np.ndarray = field(repr=False)
    grid_count: np.ndarray = field(repr=False)
    bin_center: np.ndarray = field(repr=False)
    bin_std: np.ndarray = field(repr=False)
    bin_count: np.ndarray = field(repr=False)

    def contains(self, exponent: float = 0.5) -> bool:
        """Whether the exponent CI contains ``exponent``."""
        return bool(self.exponent_ci[0] <= exponent <= self.exponent_ci[1])

    def fixed_curve(self, t: ArrayLike) -> np.ndarray:
        """σ̂·t^p."""
        return self.sigma_hat * np.asarray(t, dtype=np.float64) ** self.fixed_exponent

    def free_curve(self, t: ArrayLike) -> np.ndarray:
        """c·t^β."""
        return self.prefactor * np.asarray(t, dtype=np.float64) ** self.exponent

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, np.ndarray):
                d[k] = [None if not np.isfinite(e) else float(e) for e in v.astype(np.float64)]
            elif isinstance(v, tuple):
                d[k] = [float(e) for e in v]
        return d


def _log_grid(t_lo: int, t_hi: int, size: int) -> np.ndarray:
    if t_hi <= t_lo:
        return np.array([t_lo], dtype=np.int64)
    return np.unique(np.round(np.geomspace(t_lo, t_hi, size)).astype(np.int64))


def _slope(log_t: np.ndarray, log_sd: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted LS slope/intercept along the last axis; NaN entries of log_sd are dropped per row."""
    ok = np.isfinite(log_sd) & (w > 0)
    w = np.where(ok, w, 0.0)
    y = np.where(ok, log_sd, 0.0)
    sw = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        xm = (w * log_t).sum(-1) / sw
        ym = (w * y).sum(-1) / sw
        dx = log_t - xm[..., None]
        sxx = (w * dx * dx).sum(-1)
        beta = (w * dx * (y - ym[..., None])).sum(-1) / sxx
        enough = ok.sum(-1) >= 3
        beta = np.where(enough, beta, np.nan)
        alpha = np.where(enough, ym - beta * xm, np.nan)
    return beta, alpha


def sqrt_t_fit(
    cum_log_ratio: ArrayLike,
    mask: ArrayLike,
    groups: ArrayLike | None = None,
    *,
    cluster: Literal["auto", "group", "sequence"] = "auto",
    center: bool = False,
    fixed_exponent: float = 0.5,
    bin_width: int = 50,
    min_count: int = 30,
    min_sequences: int | None = None,
    max_position: int | None = 5000,
    min_position: int = 1,
    grid_size: int = 16,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> SqrtTFit:
    """Test the √t law of the cumulative log-ratio: sd(L_t) ∝ t^β with β = 0.5 under i.i.d. increments.

    Two fits on the same data (docs/theory.md §5):

    * the paper's fixed-exponent fit σ̂ = Σ_b w_b √t_b y_b / Σ_b w_b t_b (y_b the std of L_t in bins of
      ``bin_width`` positions, w_b = √count_b, bins with < ``min_count`` tokens and centres > ``max_position``
      dropped);
    * a free exponent: weighted least squares of log sd(L_t) on log t over a log-spaced grid of positions
      t ∈ [min_position, t_max] (t_max: the last position with ≥ ``min_count`` alive sequences), with weights
      n_t − 1; sd(L_t) is the ddof-1 sd over sequences alive at t (or, with ``center``, the pooled
      within-group sd, Σ_g Σ_i (L_it − m_gt)² / Σ_g (n_gt − 1)).

    The CIs of both come from a cluster bootstrap: clusters (prompt groups or sequences) are resampled with
    replacement and the fits recomputed from per-cluster sufficient statistics (percentile intervals).

    Parameters
    ----------
    cum_log_ratio : Tensor or array [N, T]
        L_t per token (e.g. :func:`ctpo_lab.ratios.cumulative_log_ratio`); masked-out values are ignored.
    mask : Tensor or array [N, T], bool or 0/1
        Valid tokens (alive positions); t counts valid tokens only.
    groups : array [N], optional
        Prompt-group id of each row (any hashable labels).
    cluster : {"auto", "group", "sequence"}
        Bootstrap unit; ``auto`` = groups when given, else sequences.
    center : bool
        Centre L_t within groups before the fits (needs ``groups``).
    fixed_exponent : float
        The exponent of the σ̂ fit (the paper's 0.5).
    bin_width, min_count, max_position : the binning of the σ̂ fit (Figure 1: 50, 30, 5000).
    min_sequences : grid positions with fewer alive sequences are dropped (default: ``min_count``).
    min_position, grid_size : the free-exponent grid.
    n_boot, confidence, seed : the bootstrap.

    Returns
    -------
    SqrtTFit

    Raises
    ------
    ValueError
        Bad shapes/values, NaN or inf on valid tokens, fewer than 2 clusters, or fewer than 3 grid positions
        with ≥ ``min_count`` sequences.
    """
    x, m = _matrix_and_mask(cum_log_ratio, mask)
    n_seq = x.shape[0]
    g = _groups(groups, n_seq)
    if cluster not in ("auto", "group", "sequence"):
        raise ValueError(f"cluster: expected 'auto', 'group' or 'sequence', got {cluster!r}")
    if cluster == "group" and g is None:
        raise ValueError("groups: cluster='group' needs groups")
    if center and g is None:
        raise ValueError("groups: center=True needs groups (one prompt-group id per row)")
    bin_width = _check_positive_int(bin_width, "bin_width")
    min_count = _check_positive_int(min_count, "min_count", 2)
    min_seq = min_count if min_sequences is None else _check_positive_int(min_sequences, "min_sequences", 2)
    min_position = _check_positive_int(min_position, "min_position")
    grid_size = _check_positive_int(grid_size, "grid_size", 3)
    n_boot = _check_positive_int(n_boot, "n_boot")
    confidence = _check_confidence(confidence)
    if max_position is not None:
        max_position = _check_positive_int(max_position, "max_position")
    if not math.isfinite(fixed_exponent):
        raise ValueError(f"fixed_exponent: expected a finite number, got {fixed_exponent!r}")
    use_group = cluster == "group" or (cluster == "auto" and g is not None)
    cid = g if use_group else np.arange(n_seq)
    assert cid is not None
    n_clusters = int(cid.max()) + 1 if n_seq else 0
    if n_clusters < 2:
        raise ValueError(f"cum_log_ratio: need at least 2 clusters ({'groups' if use_group else 'sequences'})")

    if center:
        assert g is not None
        vals, n_tok = _center(x, m, g)  # [N, T]
        m_bins = m & (n_tok >= 2)  # the σ̂ bins use ddof-corrected centred values of groups with ≥ 2 alive
        vals_bins = np.where(m_bins, vals * np.sqrt(n_tok / np.maximum(n_tok - 1.0, 1.0)), 0.0)
    else:
        vals, m_bins, vals_bins = x, m, x
    comp, alive = _compact(vals, m)  # [N, T_max]
    n_alive = alive.sum(0)  # [T_max]

    # --- free exponent on the log grid: per-cluster sufficient statistics at the grid positions
    ok_pos = np.nonzero(n_alive >= min_seq)[0] + 1
    if max_position is not None:
        ok_pos = ok_pos[ok_pos <= max_position]
    ok_pos = ok_pos[ok_pos >= min_position]
    if ok_pos.size == 0:
        raise ValueError(f"mask: no position ≥ {min_position} has {min_seq} or more alive sequences")
    grid = _log_grid(int(ok_pos.min()), int(ok_pos.max()), grid_size)
    grid = grid[n_alive[grid - 1] >= min_seq]
    if grid.size < 3:
        raise ValueError(
            f"mask: only {grid.size} grid position(s) with ≥ {min_seq} alive sequences; need 3 (lower "
            "min_sequences or supply longer/more sequences)"
        )
    a = alive[:, grid - 1].astype(np.float64)  # [N, K]
    v = comp[:, grid - 1] * a
    C = np.zeros((n_clusters, grid.size))
    c_n, c_s, c_ss = C.copy(), C.copy(), C.copy()
    np.add.at(c_n, cid, a)
    if center:
        # pooled within-group variance: numerator Σ (L − m_g)², denominator Σ (n_g − 1) spread over members
        assert g is not None
        n_g = np.zeros((int(g.max()) + 1, grid.size))
        np.add.at(n_g, g, a)
        df_i = np.where(a > 0, (n_g[g] - 1.0) / np.maximum(n_g[g], 1.0), 0.0)
        np.add.at(c_s, cid, df_i)  # c_s: degrees of freedom
        np.add.at(c_ss, cid, v * v)

        def grid_var(n: np.ndarray, s: np.ndarray, ss: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(s > 0.5, ss / s, np.nan)
    else:
        np.add.at(c_s, cid, v)
        np.add.at(c_ss, cid, v * v)

        def grid_var(n: np.ndarray, s: np.ndarray, ss: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                var = (ss - s * s / n) / (n - 1.0)
            return np.where(n >= 2, np.maximum(var, 0.0), np.nan)

    log_t = np.log(grid.astype(np.float64))

    def free_fit(n: np.ndarray, s: np.ndarray, ss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        var = grid_var(n, s, ss)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_sd = 0.5 * np.log(var)
        log_sd = np.where(np.isfinite(log_sd), log_sd, np.nan)
        beta, alpha = _slope(log_t, log_sd, np.maximum(n - 1.0, 0.0))
        return beta, alpha, np.sqrt(var)

    beta, alpha, grid_sd = free_fit(c_n.sum(0), c_s.sum(0), c_ss.sum(0))

    # --- σ̂ on bins of positions: per-cluster bin sums (the pooled sums equal diagnostics.position_profile's)
    pos = np.cumsum(m, axis=1)  # positions count every valid token
    rows, cols = np.nonzero(m_bins)
    b_idx = (pos[rows, cols] - 1) // bin_width
    n_bins = max(1, -(-x.shape[1] // bin_width))
    bn, bs, bss = (np.zeros((n_clusters, n_bins)) for _ in range(3))
    np.add.at(bn, (cid[rows], b_idx), 1.0)
    np.add.at(bs, (cid[rows], b_idx), vals_bins[rows, cols])
    np.add.at(bss, (cid[rows], b_idx), vals_bins[rows, cols] ** 2)
    centers = np.arange(n_bins) * bin_width + 1 + (bin_width - 1) / 2
    in_range = np.ones(n_bins, dtype=bool) if max_position is None else centers <= max_position
    tp = centers**fixed_exponent

    def sigma_fit(n_b: np.ndarray, s_b: np.ndarray, ss_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_b = s_b / n_b
            std_b = np.sqrt(np.maximum(ss_b / n_b - mean_b**2, 0.0))
            keep = (n_b >= min_count) & in_range
            w = np.where(keep, np.sqrt(n_b), 0.0)
            sig = (w * tp * np.where(keep, std_b, 0.0)).sum(-1) / (w * tp * tp).sum(-1)
        return sig, np.where(n_b >= min_count, std_b, np.nan)

    sigma, bin_std = sigma_fit(bn.sum(0), bs.sum(0), bss.sum(0))

    # --- cluster bootstrap (multinomial cluster weights; replicates in chunks to bound memory)
    rng = np.random.default_rng(seed)
    betas, sigmas = np.empty(n_boot), np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // max(1, n_clusters * (grid.size + n_bins))))
    done = 0
    while done < n_boot:
        k = min(chunk, n_boot - done)
        W = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=k).astype(np.float64)
        b_beta, _, _ = free_fit(W @ c_n, W @ c_s, W @ c_ss)
        betas[done:done + k] = b_beta
        sigmas[done:done + k] = sigma_fit(W @ bn, W @ bs, W @ bss)[0]
        done += k
    alpha_q = 1.0 - confidence
    qs = [100 * alpha_q / 2, 100 * (1 - alpha_q / 2)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        e_lo, e_hi = (np.nanpercentile(betas, qs) if np.isfinite(betas).any() else (math.nan, math.nan))
        s_lo, s_hi = (np.nanpercentile(sigmas, qs) if np.isfinite(sigmas).any() else (math.nan, math.nan))
    return SqrtTFit(
        sigma_hat=float(sigma),
        sigma_hat_ci=(float(s_lo), float(s_hi)),
        exponent=float(beta),
        exponent_ci=(float(e_lo), float(e_hi)),
        prefactor=float(np.exp(alpha)),
        fixed_exponent=float(fixed_exponent),
        confidence=confidence,
        n_boot=n_boot,
        n_sequences=n_seq,
        n_clusters=n_clusters,
        cluster="group" if use_group else "sequence",
        centered=bool(center),
        grid_t=grid,
        grid_sd=grid_sd,
        grid_count=c_n.sum(0),
        bin_center=centers,
        bin_std=bin_std,
        bin_count=bn.sum(0),
    )


# ----------------------------------------------------------------------------------------------------------
# drift, clip rates, ESS
# ----------------------------------------------------------------------------------------------------------


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
    x, m = _matrix_and_mask(cum_log_ratio, mask)
    prof = binned_profile(x, m, bin_width=bin_width)
    table = profile_table(prof, _check_positive_int(min_count, "min_count"))
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
        k, _ = _matrix_and_mask(kl, m, "kl")
        cum = np.cumsum(np.where(m, k, 0.0), axis=1)
        neg_cum = profile_table(binned_profile(-cum, m, bin_width=bin_width), table.min_count).mean
        kl_tok = float(k[m].mean()) if m.any() else math.nan
    return DriftProfile(table.bin_center, table.count, table.mean, neg_cum, slope, kl_tok, mean_ell)


def window_config(window: str | losses.LossConfig) -> losses.LossConfig:
    """A :class:`~ctpo_lab.losses.LossConfig` for a named window of :data:`WINDOWS`, a preset name or a config."""
    if isinstance(window, losses.LossConfig):
        return window
    if not isinstance(window, str):
        raise TypeError(f"window: expected a window/preset name or a LossConfig, got {type(window).__name__}")
    if window in WINDOWS:
        return losses.resolve_config("ctpo", name=window, **WINDOWS[window])
    if window in losses.PRESETS:
        return losses.PRESETS[window]
    raise ValueError(f"window: unknown window {window!r}; expected one of {sorted(WINDOWS) + sorted(losses.PRESETS)}")


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
    """Clip counts by position bin for a named window (:data:`WINDOWS`) or any loss preset.

    The masks come from :func:`ctpo_lab.clipping.clipped_surrogate` via
    :func:`ctpo_lab.losses.compute_policy_loss` (``log_prob = ℓ``, ``old_log_prob = 0``), so the ratio family,
    clip rule and dual clip of the preset apply.  A token counts as clipped when it is advantage-aware clipped:
    A > 0 and log w_t > upper_t, A < 0 and log w_t < lower_t, or the dual clip is active.

    Parameters
    ----------
    log_ratio : [N, T]
        Per-token ℓ_t = log π − log μ (not cumulative).
    mask : [N, T]
    advantages : [N] or [N, T], optional
        None: advantage-agnostic "outside the window" rate (above the upper or below the lower bound; the
        union of the A = +1 and A = −1 masks).
    window : str or LossConfig
        ``fixed_window``, ``sqrt_t_window``, a preset name or a config.

    Returns
    -------
    PositionProfile
        Of L_t (the cumulative sum of ``log_ratio``) with ``clipped`` counts; ``.clip_rate`` per bin.
    """
    x, m = _matrix_and_mask(log_ratio, mask, "log_ratio")
    cfg = window_config(window)
    if advantages is None:
        ones = np.ones(x.shape[0])
        clipped = _clip_masks(x, m, ones, cfg) | _clip_masks(x, m, -ones, cfg)
    else:
        adv = np.asarray(_to_numpy(advantages, "advantages"), dtype=np.float64)
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
    x, m = _matrix_and_mask(cum_log_ratio, mask)
    bin_width = _check_positive_int(bin_width, "bin_width")
    min_count = _check_positive_int(min_count, "min_count")
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
