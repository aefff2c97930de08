"""Figures of the real-LLM bias/variance measurement (``python -m ctpo_lab.llm bias``), PNG + PDF.

:func:`plot_bias_variance` places every estimator in the (variance ratio, relative bias) plane, one panel per
source of off-policyness, optionally with the exact prediction of a Markov chain at the same per-token KL
(:func:`ctpo_lab.markov.matched_chain_prediction`). :func:`plot_ratio_profiles` shows the mean of the
importance weights and their normalized effective sample size against the token position.
:func:`plot_rollout_corrections` compares the rollout corrections of a three-policy source (bf16 sampler)
per estimator.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ctpo_lab.style import ESTIMATOR_COLORS, estimator_color, estimator_label

__all__ = ["plot_bias_variance", "plot_ratio_profiles", "plot_rollout_corrections", "estimator_marker"]

_PROFILE_COLUMNS = ("source", "weight", "position", "mean", "ess")
_PROFILE_OPTIONAL = ("mean_lo", "mean_hi")

#: marker per estimator: a clipped preset shares the colour of its bare weight (``ctpo_lab.style``) and differs
#: by marker (unclipped: circle; its canonical clipped loss: square)
_MARKERS: dict[str, str] = {
    "unclipped_token": "o",
    "grpo": "s",
    "unclipped_cumulative": "o",
    "ctpo": "s",
    "ctpo_fixed": "D",
    "unclipped_sequence": "P",
    "unclipped_sequence_geomean": "o",
    "gspo": "s",
}
_FALLBACK_MARKERS = ("^", "v", "<", ">", "h", "*", "X", "p")
_PANELS_PER_ROW = 5
_DPI = 150


def estimator_marker(name: str) -> str:
    """Matplotlib marker of an estimator; names outside the LLM set get a marker from a fixed cycle."""
    if name in _MARKERS:
        return _MARKERS[name]
    return _FALLBACK_MARKERS[sum(map(ord, str(name))) % len(_FALLBACK_MARKERS)]


def _pyplot():
    """``matplotlib.pyplot``, selecting the Agg backend only when no backend was chosen yet."""
    import matplotlib

    getter = getattr(matplotlib.rcParams, "_get_backend_or_none", None)  # matplotlib >= 3.6
    chosen = ("matplotlib.pyplot" in sys.modules or bool(os.environ.get("MPLBACKEND"))
              or (getter is not None and getter() is not None))
    if not chosen:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=_DPI, bbox_inches="tight")
    fig.savefig(paths[1], dpi=_DPI, bbox_inches="tight")
    return paths


def _check_frame(df: object, arg: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{arg} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{arg} lacks columns {missing} (needs {list(required)})")
    df = df.copy()
    for c in optional:
        if c not in df.columns:
            df[c] = np.nan
    return df


def _check_out_dir(out_dir: object, name: object) -> Path:
    if not isinstance(out_dir, (str, os.PathLike)):
        raise ValueError(f"out_dir must be a path, got {type(out_dir).__name__}")
    if not isinstance(name, str) or not name or "/" in name or "\\" in name:
        raise ValueError(f"name must be a non-empty file stem without separators, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _finite(x: object) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _err(center: float, lo: object, hi: object) -> list[list[float]] | None:
    """Asymmetric error-bar lengths ``[[below], [above]]``; ``None`` when the interval is not finite."""
    if not (_finite(lo) and _finite(hi)):
        return None
    return [[max(center - float(lo), 0.0)], [max(float(hi) - center, 0.0)]]


#: y quantities of :func:`plot_bias_variance`: table column → (prediction column prefix, axis label)
BIAS_MEASURES: dict[str, tuple[str, str]] = {
    "rel_bias": ("relative_bias", "relative bias ‖bias‖ / ‖g_ref‖"),
    "bias_to_noise": ("bias_to_noise", "‖bias‖² / tr Cov_ref (one prompt group)"),
}


def plot_bias_variance(table: pd.DataFrame, prediction: pd.DataFrame | None, out_dir: Path | str, *,
                       name: str = "bias_variance", y: str = "rel_bias") -> list[Path]:
    """Bias against variance ratio, one panel per source, each estimator with its 95% intervals.

    ``y`` chooses the bias measure (:data:`BIAS_MEASURES`): ``rel_bias`` (‖bias‖/‖g_ref‖, meaningful only where
    the reference gradient is resolved) or ``bias_to_noise`` (‖bias‖² in units of the reference's per-group
    variance, symmetric-log axis: the noise-corrected estimate can be < 0 within noise); the prediction's
    columns are then ``{prefix}_median/_min/_max`` with the prefix of :data:`BIAS_MEASURES`.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per (source, estimator): ``source``, ``estimator``, ``rel_bias`` (``‖bias‖/‖g_ref‖``),
        ``var_ratio`` (``tr Cov`` of the estimator over that of the on-policy reference), and optionally
        ``rel_bias_lo``/``rel_bias_hi``, ``var_ratio_lo``/``var_ratio_hi`` (95% interval, NaN = not drawn)
        and ``mean_kl`` (per-token KL of the source, shown in the panel title). Other columns are ignored.
        Panels follow the order of first appearance of ``source``. Estimators outside
        :data:`ctpo_lab.style.ESTIMATOR_COLORS` are drawn in the style's fallback grey with their raw name.
    prediction : pandas.DataFrame or None
        Exact chain prediction at the matched KL, per (source, estimator): ``relative_bias_median``,
        ``relative_bias_min``, ``relative_bias_max``, ``var_ratio_median``, ``var_ratio_min``,
        ``var_ratio_max`` (e.g. :func:`ctpo_lab.markov.summarize_prediction` with a ``source`` column
        added). Drawn as hollow markers of the same colour with min–max bars; rows whose source has no
        panel are ignored.
    out_dir : Path or str
        Created if missing.
    name : str
        File stem: writes ``{name}.png`` (dpi 150) and ``{name}.pdf``.

    Returns
    -------
    list of Path
        The PNG and PDF paths.
    """
    if y not in BIAS_MEASURES:
        raise ValueError(f"y: expected one of {tuple(BIAS_MEASURES)}, got {y!r}")
    prefix, ylabel = BIAS_MEASURES[y]
    table = _check_frame(table, "table", ("source", "estimator", y, "var_ratio"),
                         (f"{y}_lo", f"{y}_hi", "var_ratio_lo", "var_ratio_hi", "mean_kl"))
    if prediction is not None:
        prediction = _check_frame(prediction, "prediction", ("source", "estimator", f"{prefix}_median",
                                                             f"{prefix}_min", f"{prefix}_max", "var_ratio_median",
                                                             "var_ratio_min", "var_ratio_max"))
    out = _check_out_dir(out_dir, name)
    if table.empty:
        raise ValueError("table has no rows")
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    sources = list(dict.fromkeys(table["source"].tolist()))
    ncol = min(len(sources), _PANELS_PER_ROW)
    nrow = math.ceil(len(sources) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.8 * nrow), sharey=True, squeeze=False)
    handles: dict[str, Line2D] = {}
    for i, src in enumerate(sources):
        ax = axes[i // ncol, i % ncol]
        rows = table[table["source"] == src]
        drawn, predicted = 0, 0
        for _, r in rows.iterrows():
            est = str(r["estimator"])
            xv, yv = r["var_ratio"], r[y]
            if not (_finite(xv) and _finite(yv)) or float(xv) <= 0:
                continue
            xv, yv = float(xv), float(yv)
            col, mk = estimator_color(est), estimator_marker(est)
            ax.errorbar([xv], [yv], xerr=_err(xv, r["var_ratio_lo"], r["var_ratio_hi"]),
                        yerr=_err(yv, r[f"{y}_lo"], r[f"{y}_hi"]), fmt=mk, color=col, ms=6, mec="k",
                        mew=0.5, elinewidth=1.0, capsize=2, zorder=3)
            handles.setdefault(est, Line2D([], [], ls="", marker=mk, color=col, mec="k", mew=0.5, ms=6,
                                           label=estimator_label(est)))
            drawn += 1
        if prediction is not None:
            for _, p in prediction[prediction["source"] == src].iterrows():
                est = str(p["estimator"])
                xv, yv = p["var_ratio_median"], p[f"{prefix}_median"]
                if not (_finite(xv) and _finite(yv)) or float(xv) <= 0:
                    continue
                xv, yv = float(xv), float(yv)
                col = estimator_color(est)
                ax.errorbar([xv], [yv], xerr=_err(xv, p["var_ratio_min"], p["var_ratio_max"]),
                            yerr=_err(yv, p[f"{prefix}_min"], p[f"{prefix}_max"]),
                            fmt=estimator_marker(est), color=col, mfc="none", mec=col, mew=1.2, ms=7,
                            elinewidth=0.8, ls="none", alpha=0.8, zorder=2)
                handles.setdefault(est, Line2D([], [], ls="", marker=estimator_marker(est), color=col, mec="k",
                                               mew=0.5, ms=6, label=estimator_label(est)))
                predicted += 1
        kls = [float(v) for v in rows["mean_kl"] if _finite(v)]
        kl_text = f"KL/token = {kls[0]:.3g}" if kls else "KL/token = n/a"
        ax.set_title(f"{src}\n{kl_text}", fontsize=10)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="k", lw=0.6, ls=":", zorder=1)
        ax.axhline(0.0, color="k", lw=0.6, ls=":", zorder=1)
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel("variance ratio tr Cov / tr Cov(on-policy)")
        if drawn + predicted == 0:
            ax.set_xlim(0.1, 10.0)
        if drawn == 0:
            ax.text(0.5, 0.5, "no data" if predicted == 0 else "no LLM data", transform=ax.transAxes,
                    ha="center", va="center", color="0.4")
        if y == "bias_to_noise":
            ax.set_yscale("symlog", linthresh=1e-3)
        if i % ncol == 0:
            ax.set_ylabel(ylabel)
    for j in range(len(sources), nrow * ncol):
        axes[j // ncol, j % ncol].set_visible(False)
    if y == "rel_bias":
        axes[0, 0].set_ylim(bottom=min(0.0, axes[0, 0].get_ylim()[0]))  # shared: relative bias starts at 0
    legend = list(handles.values())
    legend.append(Line2D([], [], ls="", marker="o", color="0.3", ms=6, label="filled: LLM (95% CI)"))
    if prediction is not None:
        legend.append(Line2D([], [], ls="", marker="o", color="0.3", mfc="none", ms=7,
                             label="hollow: exact chain, matched KL (min–max over seeds)"))
    fig.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(legend), 5), fontsize=8,
               frameon=False)
    fig.suptitle("Bias and variance of the ratio estimators per source of off-policyness")
    fig.tight_layout()
    paths = _save(fig, out, name)
    plt.close(fig)
    return paths


def _weight_color(weight: str) -> str:
    return estimator_color(weight) if weight in ESTIMATOR_COLORS else "#333333"


def plot_ratio_profiles(profile: pd.DataFrame, out_dir: Path | str, name: str = "ratio_profiles") -> list[Path]:
    """Mean importance weight (top) and normalized ESS (bottom) against token position, one column per source.

    Parameters
    ----------
    profile : pandas.DataFrame
        Columns ``source``, ``weight`` (``"cumulative"``, ``"token"``, ``"sequence_geomean"``; other names are
        drawn in grey), ``position`` (int), ``mean`` (``E_μ`` of the weight), ``mean_lo``/``mean_hi`` (95% interval,
        optional, NaN = no band), ``ess`` (normalized ESS ``(E w)² / E w²`` in ``(0, 1]``); ``var`` and
        ``n`` are ignored.
    out_dir : Path or str
        Created if missing.
    name : str
        File stem: writes ``{name}.png`` (dpi 150) and ``{name}.pdf``.

    Returns
    -------
    list of Path
        The PNG and PDF paths.
    """
    profile = _check_frame(profile, "profile", _PROFILE_COLUMNS, _PROFILE_OPTIONAL)
    out = _check_out_dir(out_dir, name)
    if profile.empty:
        raise ValueError("profile has no rows")
    plt = _pyplot()

    sources = list(dict.fromkeys(profile["source"].tolist()))
    n = len(sources)
    fig, axes = plt.subplots(2, n, figsize=(4.0 * n, 6.4), sharex="col", squeeze=False)
    labels: dict[str, object] = {}
    for j, src in enumerate(sources):
        top, bot = axes[0, j], axes[1, j]
        d = profile[profile["source"] == src]
        drawn = False
        for w, g in d.groupby("weight", sort=False):
            g = g.sort_values("position")
            pos = pd.to_numeric(g["position"], errors="coerce").to_numpy(dtype=float)
            mean = pd.to_numeric(g["mean"], errors="coerce").to_numpy(dtype=float)
            lo = pd.to_numeric(g["mean_lo"], errors="coerce").to_numpy(dtype=float)
            hi = pd.to_numeric(g["mean_hi"], errors="coerce").to_numpy(dtype=float)
            ess = pd.to_numeric(g["ess"], errors="coerce").to_numpy(dtype=float)
            col = _weight_color(str(w))
            if np.isfinite(mean).any():
                (h,) = top.plot(pos, mean, color=col, lw=1.5, label=str(w))
                labels.setdefault(str(w), h)
                band = np.isfinite(lo) & np.isfinite(hi)
                if band.any():
                    top.fill_between(pos, np.where(band, lo, np.nan), np.where(band, hi, np.nan), color=col,
                                     alpha=0.2, lw=0)
                drawn = True
            if np.isfinite(ess).any():
                (h,) = bot.plot(pos, ess, color=col, lw=1.5, label=str(w))
                labels.setdefault(str(w), h)
                drawn = True
        top.axhline(1.0, color="k", lw=0.8, ls="--")
        top.set_title(str(src), fontsize=10)
        bot.set_ylim(0.0, 1.05)
        bot.set_xlabel("token position t")
        for ax in (top, bot):
            ax.grid(alpha=0.3)
        if not drawn:
            for ax in (top, bot):
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.4")
        if j == 0:
            top.set_ylabel("E_μ[weight] (95% CI)")
            bot.set_ylabel("normalized ESS (E w)² / E w²")
    if labels:
        fig.legend(list(labels.values()), list(labels.keys()), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=len(labels), fontsize=8, frameon=False, title="weight")
    fig.suptitle("Importance weights by token position")
    fig.tight_layout()
    paths = _save(fig, out, name)
    plt.close(fig)
    return paths


def plot_rollout_corrections(table: pd.DataFrame, out_dir: Path | str,
                             name: str = "rollout_corrections") -> list[Path]:
    """Bias (in units of the reference's noise) and variance ratio of every (estimator × rollout correction)
    pair, one row of two panels per three-policy source: corrections on the x axis, one marker per estimator,
    95% intervals as bars.

    ``table``: rows of ``source``, ``estimator``, ``rollout_correction``, ``bias_to_noise``, ``var_ratio`` (and
    optionally their ``_lo``/``_hi`` columns, ``mean_kl``); rows without a correction (empty/NaN) are ignored.
    Writes ``{name}.png`` and ``{name}.pdf`` in ``out_dir``; returns their paths.
    """
    cols = ("bias_to_noise", "var_ratio")
    table = _check_frame(table, "table", ("source", "estimator", "rollout_correction", *cols),
                         tuple(f"{c}_{e}" for c in cols for e in ("lo", "hi")) + ("mean_kl",))
    table = table[table["rollout_correction"].notna() & (table["rollout_correction"].astype(str) != "")]
    out = _check_out_dir(out_dir, name)
    if table.empty:
        raise ValueError("table has no rows with a rollout_correction")
    plt = _pyplot()
    sources = list(dict.fromkeys(table["source"].tolist()))
    fig, axes = plt.subplots(len(sources), 2, figsize=(11, 3.6 * len(sources)), squeeze=False)
    for i, src in enumerate(sources):
        rows = table[table["source"] == src]
        corrs = list(dict.fromkeys(rows["rollout_correction"].astype(str)))
        ests = list(dict.fromkeys(rows["estimator"].astype(str)))
        width = 0.8 / max(len(ests), 1)
        for j, (col, label) in enumerate(((cols[0], BIAS_MEASURES["bias_to_noise"][1]),
                                          (cols[1], "tr Cov / tr Cov(on-policy)"))):
            ax = axes[i, j]
            for e, est in enumerate(ests):
                sub = rows[rows["estimator"].astype(str) == est]
                sub = sub.set_index(sub["rollout_correction"].astype(str))
                for x, corr in enumerate(corrs):
                    if corr not in sub.index or not _finite(sub.loc[corr, col]):
                        continue
                    r = sub.loc[corr]
                    yv = float(r[col])
                    ax.errorbar([x - 0.4 + width * (e + 0.5)], [yv], yerr=_err(yv, r[f"{col}_lo"], r[f"{col}_hi"]),
                                fmt=estimator_marker(est), color=estimator_color(est), ms=5, mec="k", mew=0.4,
                                elinewidth=0.8, capsize=1.5, label=estimator_label(est) if x == 0 else None)
            ax.set_xticks(range(len(corrs)))
            ax.set_xticklabels(corrs, rotation=25, ha="right", fontsize=8)
            ax.grid(alpha=0.3)
            ax.set_ylabel(label, fontsize=9)
            if col == "bias_to_noise":
                ax.set_yscale("symlog", linthresh=1e-3)
                ax.axhline(0.0, color="k", lw=0.6, ls=":")
            else:
                ax.set_yscale("log")
                ax.axhline(1.0, color="k", lw=0.6, ls=":")
            kls = [float(v) for v in rows["mean_kl"] if _finite(v)]
            ax.set_title(f"{src} (KL(μ‖π)/token = {kls[0]:.3g})" if kls else src, fontsize=10)
        if i == 0:
            axes[0, 1].legend(fontsize=7, loc="best")
    fig.suptitle("Rollout corrections on a bf16 sampler: bias and variance against the on-policy reference")
    fig.tight_layout()
    paths = _save(fig, out, name)
    plt.close(fig)
    return paths
