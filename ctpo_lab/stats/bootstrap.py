"""Bootstrap confidence intervals over seeds and runs, and the one ``value [low, high]`` formatter.

* :func:`bootstrap_ci` — a statistic (mean, median, IQM or a callable) of one score per run with a percentile
  bootstrap: resample the n runs with replacement B times, recompute the statistic θ*_b on each replicate, and
  report (q_{α/2}, q_{1−α/2}) of {θ*_b}, α = 1 − confidence.  For the IQM of [runs, tasks] scores the runs are
  resampled independently within each task (the stratified bootstrap of rliable).
* :func:`curve_bands` — the same point-wise along a family of curves (one per run).
* :func:`percentile_interval` — the (α/2, 1 − α/2) percentiles of bootstrap replicates (every bootstrap of the
  package ends with it).
* :func:`iqm` — the interquartile mean.
* :func:`format_ci` — ``estimate [low, high]`` strings for tables and captions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from ctpo_lab.stats.inputs import ArrayLike, check_confidence, check_positive_int, to_numpy

__all__ = [
    "BootstrapCI",
    "CurveBands",
    "iqm",
    "percentile_interval",
    "bootstrap_ci",
    "curve_bands",
    "format_ci",
]


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

    x = np.asarray(to_numpy(values, "values"), dtype=np.float64)
    if x.size == 0:
        raise ValueError("values: empty")
    if axis is None:
        return float(trim_mean(x.reshape(-1), 0.25))
    return trim_mean(x, 0.25, axis=axis)


def percentile_interval(replicates: ArrayLike, confidence: float = 0.95, axis: int | None = None) -> np.ndarray:
    """The percentile bootstrap interval: the 100·α/2 and 100·(1 − α/2) percentiles of the replicates,
    α = 1 − ``confidence`` (NaN replicates ignored, :func:`numpy.nanpercentile` with linear interpolation).

    Returns an array whose first axis is (low, high): shape [2] for ``axis=None``, else [2, ...] with ``axis``
    reduced.
    """
    alpha = 1.0 - check_confidence(confidence)
    return np.nanpercentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=axis)


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
    x = np.asarray(to_numpy(values, "values"), dtype=np.float64)
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
    confidence = check_confidence(confidence)
    n_boot = check_positive_int(n_boot, "n_boot")
    name, f = _stat_fn(statistic)
    rng = np.random.default_rng(seed)
    stratified = name == "iqm" and x.ndim == 2
    flat = x.reshape(x.shape[0], -1)
    est = float(f(flat.reshape(1, -1), 1)[0])
    reps = _resample_rows(x, n_boot, rng, stratified).reshape(n_boot, -1)
    boot = np.asarray(f(reps, 1), dtype=np.float64)
    lo, hi = percentile_interval(boot, confidence)
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
    c = np.asarray(to_numpy(curves, "curves"), dtype=np.float64)
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
    confidence = check_confidence(confidence)
    n_boot = check_positive_int(n_boot, "n_boot")
    xs = None
    if x is not None:
        xs = np.asarray(to_numpy(x, "x"), dtype=np.float64).reshape(-1)
        if xs.shape[0] != c.shape[-1]:
            raise ValueError(f"x: expected {c.shape[-1]} points, got {xs.shape[0]}")
    name, f = _stat_fn(statistic)
    rng = np.random.default_rng(seed)
    stratified = name == "iqm" and c.ndim == 3
    P = c.shape[-1]
    pooled = c.reshape(-1, P)  # [n_runs·n_tasks, P]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN points give NaN, on purpose
        est = np.asarray(f(pooled, 0), dtype=np.float64)
        reps = _resample_rows(c, n_boot, rng, stratified).reshape(n_boot, -1, P)
        boot = np.asarray(f(reps, 1), dtype=np.float64)  # [n_boot, P]
        lo, hi = percentile_interval(boot, confidence, axis=0)
    method = f"{name}/{'stratified' if stratified else 'percentile'}"
    return CurveBands(est, lo, hi, confidence, method, n_boot, xs)




def format_ci(estimate: float, low: float, high: float, digits: int = 2,
              style: Literal["g", "f"] = "g") -> str:
    """``estimate [low, high]`` for tables and captions.

    ``style="g"``: ``digits`` significant digits; ``style="f"``: ``digits`` digits after the decimal point.
    A non-finite ``estimate`` gives ``n/a``; a non-finite bound drops the bracket (only the estimate is shown).
    """
    if style not in ("g", "f"):
        raise ValueError(f"style: expected 'g' or 'f', got {style!r}")
    if not math.isfinite(estimate):
        return "n/a"
    f = f"{{:.{digits}{style}}}"
    ci = f" [{f.format(low)}, {f.format(high)}]" if math.isfinite(low) and math.isfinite(high) else ""
    return f.format(estimate) + ci
