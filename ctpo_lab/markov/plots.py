"""Figures of the standard study (PNG + PDF): bias and variance vs T, variance ratio, per-position profiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ctpo_lab.losses import FIGURE1_WINDOWS


def _style() -> tuple:
    from ctpo_lab import style

    return style.estimator_color, style.estimator_label


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def _clipped(name: str) -> bool:
    """Drawn dashed: presets with a clip rule or a dual clip (the loss presets, not the bare IS weights)."""
    from ctpo_lab.losses import PRESETS

    cfg = PRESETS.get(name)
    return cfg is not None and (cfg.clip != "none" or cfg.dual_clip is not None)


def plot_bias_variance(sweep: pd.DataFrame, out: Path) -> list[Path]:
    """Relative bias and trace of the covariance against T, per estimator, for each signal (middle KL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color, label = _style()
    kls = sorted(sweep["kl"].unique())
    kl = kls[len(kls) // 2]
    signals = list(sweep["signal"].unique())
    fig, axes = plt.subplots(2, len(signals), figsize=(5.2 * len(signals), 7.5), squeeze=False)
    floor = 1e-6
    handles: dict[str, object] = {}
    for j, sig in enumerate(signals):
        d = sweep[(sweep["kl"] == kl) & (sweep["signal"] == sig)]
        for est, g in d.groupby("estimator", sort=False):
            g = g.sort_values("T")
            ls = "--" if _clipped(est) else "-"
            kw = {"color": color(est), "ls": ls, "marker": "o", "ms": 3, "label": label(est)}
            (h,) = axes[0, j].plot(g["T"], np.maximum(g["relative_bias"], floor), **kw)
            axes[1, j].plot(g["T"], g["trace_cov"], **kw)
            handles.setdefault(label(est), h)
        axes[0, j].axhline(floor, color="k", lw=0.6, ls=":")
        axes[0, j].text(2, floor * 1.6, "unbiased (exact 0, shown at 1e-6)", fontsize=7)
        axes[0, j].set(xscale="log", yscale="log", title=f"signal {sig}, per-token KL {kl}",
                       ylabel="‖E X − ∇J‖ / ‖∇J‖")
        axes[1, j].set(xscale="log", yscale="log", xlabel="horizon T", ylabel="tr Cov X")
        axes[0, j].grid(alpha=0.3)
        axes[1, j].grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=4, fontsize=8,
               bbox_to_anchor=(0.5, -0.06))
    fig.suptitle("Exact bias and variance per estimator (Markov lab)")
    paths = _save(fig, out, "bias_variance_vs_T")
    plt.close(fig)
    return paths


def plot_variance_ratio(profiles: pd.DataFrame, out: Path) -> list[Path]:
    """Var ρ_{1:T} / Var ρ_{1:t} (i.i.d. chain) against t, with T/t and (1+δ)^{T−t}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = profiles[profiles["chain"] == "iid"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (kl, g) in enumerate(d.groupby("kl_level")):
        c = f"C{i}"
        ax.plot(g["t"], g["var_ratio_seq_cum"], color=c, lw=2, label=f"exact, KL={kl} (χ²={g['chi2'].iloc[0]:.3g})")
        ax.plot(g["t"], g["growth_closed_form"], color=c, ls=":", label="(1+δ)^{T−t}")
    g = d[d["kl_level"] == d["kl_level"].min()]
    ax.plot(g["t"], g["T_over_t"], color="k", ls="--", label="T/t")
    ax.set(yscale="log", xlabel="position t", ylabel="Var(sequence) / Var(cumulative_t)",
           title=f"Variance ratio, i.i.d. chain, T={int(d['T'].iloc[0])}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths = _save(fig, out, "variance_ratio")
    plt.close(fig)
    return paths


def plot_position_profiles(clip: pd.DataFrame, out: Path) -> list[Path]:
    """sd(L_t) with σ√t, and clip rates of the fixed window [0.5, 5] vs the √t window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color, label = _style()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6.5, 7), sharex=True)
    t = clip["t"].to_numpy()
    sig = float(np.sqrt(clip["var_L_exact"].iloc[0]))
    a1.plot(t, clip["sd_L"], color="k", lw=2, label="exact sd(L_t)")
    a1.plot(t, sig * np.sqrt(t), color="C3", ls="--", label=f"σ√t, σ={sig:.4f}")
    a1.fill_between(t, 0.8 * sig * np.sqrt(t), 1.2 * sig * np.sqrt(t), color="C3", alpha=0.1, label="±20%")
    a1.plot(t, -clip["mean_L_exact"], color="C0", ls=":", label="drift −E L_t")
    a1.set(ylabel="L_t", title="Gaussian-like walk (i.i.d. chain): spread and drift of L_t")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    for name in FIGURE1_WINDOWS:
        a2.plot(t, clip[f"{name}_rate"], color=color(name), lw=2, label=label(name))
        a2.plot(t, clip[f"{name}_low"], color=color(name), ls=":", lw=1, label=f"{name}: P(L_t < lower)")
    a2.set(xlabel="position t", ylabel="clip rate ½(P high + P low)", title="Exact clip rate by position")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    paths = _save(fig, out, "position_profiles")
    plt.close(fig)
    return paths
