"""Figure-1-style plots from :func:`ctpo_lab.analysis.trajectory_statistics` results (any producer).

``figure1(results)``: top, std of L_t by position bin with the paper's σ̂√t fit (solid, ±20% band for the
first series) and the free-exponent fit (dotted); bottom, advantage-aware clip rate by position for the fixed
window [0.5, 5] and the √t window.  ``drift_figure(results)``: mean L_t against −Σ KL by position.
``clip_ess_figure(result, presets)``: the clip rate of each preset by position, and the ESS by position.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctpo_lab.losses import FIGURE1_WINDOWS
from ctpo_lab.stats import format_ci

__all__ = ["figure1", "drift_figure", "clip_ess_figure"]


def _arr(values: list[float | None] | None) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in (values or [])], dtype=float)


def _shade(i: int, n: int, base: str):
    import matplotlib.colors as mcolors

    s = 1.0 if n == 1 else 0.4 + 0.6 * i / (n - 1)
    rgb = np.array(mcolors.to_rgb(base))
    return tuple(rgb * s + (1 - s) * 0.85)


def figure1(results: dict[str, dict[str, Any]], bin_width: int, *, title: str | None = None):
    """Two-panel Figure-1 analogue; ``results`` maps a series name (e.g. ``stale_k4``) to its statistics."""
    import matplotlib.pyplot as plt

    from ctpo_lab.style import estimator_color, estimator_label

    ok = {k: v for k, v in results.items() if "error" not in v}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7.5, 7.5), sharex=True)
    base = estimator_color("cumulative")
    styles = ["-", "--", ":", "-."]
    for i, (name, r) in enumerate(ok.items()):
        c = _shade(i, len(ok), base)
        t = _arr(r["bin_center"])
        sd = _arr(r["bin_std"])
        finite = np.isfinite(sd)
        ax1.plot(t[finite], sd[finite], "o", color=c, ms=4, label=f"{name}: sd($L_t$)")
        if finite.any():
            tt = np.linspace(1, np.nanmax(t[finite]), 200)
            fit = r["sigma_hat"] * np.sqrt(tt)
            ax1.plot(tt, fit, "-", color=c, lw=1.2, label=f"σ̂√t, σ̂ = {r['sigma_hat']:.4f}")
            if i == len(ok) - 1:
                ax1.fill_between(tt, 0.8 * fit, 1.2 * fit, color=c, alpha=0.12, lw=0, label="σ̂√t ± 20%")
            lo, hi = r["exponent_ci"]
            ax1.plot(tt, r["prefactor"] * tt ** r["exponent"], ":", color=c, lw=1.4,
                     label=f"free fit β = {format_ci(r['exponent'], lo, hi, 2, style='f')}")
        for window in FIGURE1_WINDOWS:
            rate = _arr(r["clip_rates"].get(window, {}).get("by_bin"))
            if rate.size:
                ax2.plot(t[: rate.size], 100 * rate, styles[i % len(styles)], marker="o", ms=3,
                         color=estimator_color(window), alpha=0.45 + 0.55 * (i + 1) / len(ok),
                         label=f"{estimator_label(window)} ({name})")
    ax1.set_ylabel("std of $L_t$ (nats)")
    ax1.set_title(title or "Spread of the cumulative log-ratio by position")
    ax1.legend(fontsize=7, ncol=2)
    ax2.set_xlabel(f"token position t (bins of {bin_width})")
    ax2.set_ylabel("advantage-aware clip rate (%)")
    ax2.legend(fontsize=7, ncol=2)
    return fig


def drift_figure(results: dict[str, dict[str, Any]], *, title: str | None = None):
    """Mean L_t by position bin (points) and −Σ KL(μ‖π) (dashed, when the producer knows the exact KL)."""
    import matplotlib.pyplot as plt

    from ctpo_lab.style import estimator_color

    ok = {k: v for k, v in results.items() if "error" not in v}
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, r) in enumerate(ok.items()):
        c = _shade(i, len(ok), estimator_color("cumulative"))
        t = _arr(r["bin_center"])
        mean = _arr(r["bin_mean"])
        ax.plot(t[: mean.size], mean, "o-", color=c, ms=3,
                label=f"{name}: mean $L_t$ (drift {r['drift_per_token']:.2e}/token)")
        nk = _arr(r.get("bin_neg_cum_kl"))
        if np.isfinite(nk).any():
            ax.plot(t[: nk.size], nk, "--", color=c, label=f"{name}: −Σ KL(μ‖π)")
    ax.axhline(0, color="k", lw=0.6)
    ax.set(xlabel="token position t", ylabel="$L_t$ (nats)", title=title or "Drift of the cumulative log-ratio")
    ax.legend(fontsize=7)
    return fig


def clip_ess_figure(result: dict[str, Any], presets: list[str], *, title: str | None = None):
    """Top: clip rate by position of each preset in ``presets`` (keys of ``result["clip_rates"]``); bottom: the
    normalised ESS of the cumulative weights by position."""
    import matplotlib.pyplot as plt

    from ctpo_lab.style import estimator_color, estimator_label

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    t = _arr(result["bin_center"])
    for name in presets:
        rate = _arr(result["clip_rates"].get(name, {}).get("by_bin"))
        if rate.size:
            ax1.plot(t[: rate.size], 100 * rate, "o-", ms=3, color=estimator_color(name), label=estimator_label(name))
    ax1.set(ylabel="clip rate (%)", title=title or "Clip rate of each preset by position")
    ax1.legend(fontsize=7)
    ess = _arr(result.get("ess_by_bin"))
    te = _arr(result.get("ess_bin_center"))
    ax2.plot(te[: ess.size], ess, "o-", ms=3, color=estimator_color("cumulative"))
    ax2.set(xlabel="token position t", ylabel="normalised ESS of $e^{L_t}$", ylim=(0, 1.05))
    return fig
