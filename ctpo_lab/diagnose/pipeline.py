"""Diagnose a run: read its trajectories or dumps, compute the Figure-1 statistics, write a report.

:func:`diagnose` is the library function behind ``python -m ctpo_lab.diagnose PATH``.  The statistics come from
:func:`ctpo_lab.analysis.trajectory_statistics` (σ̂ and the free √t exponent with a cluster-bootstrap CI, drift,
clip rates by position for any preset, ESS by position); this module only adds the per-token KL estimate and
writes ``summary.json``, ``report.md``, the PNG figures and a self-contained ``report.html``.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctpo_lab import analysis, stats
from ctpo_lab.analysis import finite_or_none
from ctpo_lab.diagnose import readers
from ctpo_lab.losses import FIGURE1_WINDOWS
from ctpo_lab.runsafety import atomic_path, atomic_write_text, prepare_output

__all__ = ["CLIP_PRESETS", "diagnose", "summarize"]

#: training losses whose clip rates the report gives (keys of ``losses.PRESETS``)
CLIP_PRESETS = ("grpo", "gspo", "ctpo")

KL_ESTIMATOR = ("k3: mean over valid tokens of e^ℓ − 1 − ℓ, ℓ = log π − log μ (unbiased for KL(μ‖π) under μ "
                "and never negative)")



def summarize(traj: readers.Trajectories, *, seed: int = 0, bin_width: int = 50, n_boot: int = 1000,
              source: str = "") -> dict[str, Any]:
    """The JSON-ready summary of ``traj`` (see :func:`diagnose`)."""
    m = traj.mask
    ell = traj.log_ratio
    v = ell[m]
    min_count = max(2, min(30, int(m.sum(axis=0).max()) // 2))
    try:
        st = analysis.trajectory_statistics(
            ell, m, traj.advantages, traj.groups, traj.kl, bin_width=bin_width, min_count=min_count,
            min_sequences=min(10, max(2, int(m.shape[0]) // 2)), n_boot=n_boot, seed=seed,
            windows=FIGURE1_WINDOWS + CLIP_PRESETS)
    except ValueError as e:
        raise ValueError(f"path: too little data for the √t fit ({e})") from None
    clip: dict[str, Any] = {}
    aware = traj.advantages is not None
    for name in FIGURE1_WINDOWS + CLIP_PRESETS:
        if aware:
            clip[name] = st["clip_rates"][name]["overall"]
        else:  # per sign of the advantage: A = +1 and A = −1 on every token
            per_sign = {}
            for sign, label in ((1.0, "positive"), (-1.0, "negative")):
                prof = stats.clip_rate_profile(ell, m, np.full(m.shape[0], sign), window=name,
                                               bin_width=bin_width)
                per_sign[label] = float(prof.clipped.sum() / max(float(prof.count.sum()), 1.0))
            clip[name] = per_sign
    with np.errstate(over="ignore"):
        k3 = float(np.mean(np.expm1(v) - v))
    out: dict[str, Any] = {
        "source": source,
        "format": traj.format,
        "steps": traj.steps,
        "num_sequences": int(m.any(axis=1).sum()),
        "num_tokens": int(m.sum()),
        "mean_length": float(m.sum() / max(1, int(m.any(axis=1).sum()))),
        "kl_per_token": finite_or_none(k3),
        "kl_estimator": KL_ESTIMATOR,
        "kl_per_token_k1": finite_or_none(-v.mean()),
        "kl_per_token_exact": st["kl_per_token"],
        "drift_per_token": finite_or_none(v.mean()),
        "drift_slope": st["drift_per_token"],
        "sigma_hat": st["sigma_hat"],
        "sigma_hat_ci": st["sigma_hat_ci"],
        "exponent": st["exponent"],
        "exponent_ci": st["exponent_ci"],
        "exponent_contains_0.5": st["exponent_contains_0.5"],
        "clip_rate_kind": "advantage-aware" if aware else "per sign of the advantage (no advantages in the input)",
        "clip_rate": clip,
        "lossy": traj.lossy,
        "capped_fraction": traj.capped_fraction,
        "cap": traj.cap,
        "notes": list(traj.notes),
        "seed": seed,
        "bin_width": bin_width,
        "by_position": {k: st[k] for k in ("bin_center", "bin_std", "bin_count", "bin_mean", "bin_neg_cum_kl",
                                           "ess_bin_center", "ess_by_bin")},
    }
    for k in out["by_position"]["ess_by_bin"]:
        if k is not None and not (0.0 <= k <= 1.0 + 1e-9):
            raise ValueError(f"path: an ESS of {k} is outside [0, 1]")
    out["_stats"] = st  # for the figures; dropped before writing
    return out


def _figures(out: Path, summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Write the PNGs; [(file name, caption)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctpo_lab.figures.position import clip_ess_figure, drift_figure, figure1

    st = summary["_stats"]
    name = "run"
    presets = list(FIGURE1_WINDOWS + CLIP_PRESETS)
    figs = [
        ("figure1.png", "sd(L_t) by position against σ̂√t and the free fit; Figure-1 window clip rates",
         figure1({name: st}, summary["bin_width"])),
        ("drift.png", "mean L_t by position (the drift)", drift_figure({name: st})),
        ("clip_ess.png", "clip rate of each preset by position; ESS by position", clip_ess_figure(st, presets)),
    ]
    done = []
    for fname, caption, fig in figs:
        fig.tight_layout()
        with atomic_path(out / fname) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        done.append((fname, caption))
    return done


def _fmt(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    s = summary
    lo, hi = s["exponent_ci"]
    rows = [
        ("format", s["format"]),
        ("steps", ", ".join(map(str, s["steps"])) if s["steps"] else "—"),
        ("sequences / tokens", f"{s['num_sequences']} / {s['num_tokens']} (mean length {s['mean_length']:.1f})"),
        ("KL(μ‖π) per token (k3)", _fmt(s["kl_per_token"])),
        ("−mean ℓ per token (k1)", _fmt(s["kl_per_token_k1"])),
        ("drift per token (mean ℓ)", _fmt(s["drift_per_token"])),
        ("σ̂ (sd L_t ≈ σ̂√t)", f"{_fmt(s['sigma_hat'])} [{_fmt(s['sigma_hat_ci'][0])}, {_fmt(s['sigma_hat_ci'][1])}]"),
        ("free exponent β (sd L_t ∝ t^β)", stats.format_ci(s["exponent"], lo, hi, 2, style="f")),
    ]
    if s["kl_per_token_exact"] is not None:
        rows.insert(4, ("exact KL per token", _fmt(s["kl_per_token_exact"])))
    for name, r in s["clip_rate"].items():
        val = f"{100 * r:.2f}%" if isinstance(r, float) else ", ".join(f"A{'>' if k == 'positive' else '<'}0: "
                                                                        f"{100 * x:.2f}%" for k, x in r.items())
        rows.append((f"clip rate {name}", val))
    rows.append(("lossy input", f"yes: {100 * s['capped_fraction']:.3f}% of the tokens at the cap {s['cap']}"
                 if s["lossy"] else "no"))
    return rows


def _markdown(summary: dict[str, Any], figs: list[tuple[str, str]]) -> str:
    lines = [f"# Diagnosis of {summary['source']}", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _rows(summary)]
    lines += ["", f"Clip rates: {summary['clip_rate_kind']}. KL estimator: {summary['kl_estimator']}.", ""]
    lines += [f"- {n}" for n in summary["notes"]]
    for fname, caption in figs:
        lines += ["", f"![{caption}]({fname})", "", caption]
    return "\n".join(lines) + "\n"


def _html(summary: dict[str, Any], figs: list[tuple[str, str]], out: Path) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>Diagnosis of {e(summary['source'])}</title>",
             "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}"
             "td{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}</style></head><body>",
             f"<h1>Diagnosis of {e(summary['source'])}</h1><table>"]
    parts += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in _rows(summary)]
    parts.append(f"</table><p>Clip rates: {e(summary['clip_rate_kind'])}. KL estimator: "
                 f"{e(summary['kl_estimator'])}.</p>")
    if summary["notes"]:
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in summary["notes"]) + "</ul>")
    for fname, caption in figs:
        data = base64.b64encode((out / fname).read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def diagnose(path: str | os.PathLike[str], out: str | os.PathLike[str], *, steps: Sequence[int] | None = None,
             seed: int = 0, dump_mode: str = "cumprod", overwrite: bool = False, bin_width: int = 50,
             n_boot: int = 1000) -> dict[str, Any]:
    """Diagnose the run at ``path`` into the folder ``out``; returns the summary written to ``summary.json``.

    Parameters
    ----------
    path : a trajectory parquet (file or directory of shards) or npz dumps (a file or a directory), see
        :mod:`ctpo_lab.diagnose.readers`.
    out : the output folder (created, locked and marked; refused when not empty unless ``overwrite``).
    steps : dump steps to pool (default all).
    seed : bootstrap seed.
    dump_mode : loss mode of weights-only dumps (:data:`ctpo_lab.diagnose.readers.DUMP_MODES`).
    bin_width, n_boot : position bins and bootstrap resamples of the √t fit.

    Returns
    -------
    dict with ``format``, ``num_sequences``, ``num_tokens``, ``kl_per_token`` (k3 estimate of KL(μ‖π)),
    ``drift_per_token`` (mean ℓ), ``sigma_hat``, ``exponent``, ``exponent_ci``, ``clip_rate`` ({preset: rate},
    advantage-aware when the input has advantages, per sign otherwise), ``lossy``, ``by_position`` (binned
    sd L_t, mean L_t, ESS) and ``notes``.
    """
    if isinstance(bin_width, bool) or not isinstance(bin_width, int) or bin_width < 1:
        raise ValueError(f"bin_width: expected an int ≥ 1, got {bin_width!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 10:
        raise ValueError(f"n_boot: expected an int ≥ 10, got {n_boot!r}")
    out = Path(out)
    prepare_output(out, command="diagnose", overwrite=overwrite, check_only=True)  # before any reading
    traj = readers.read_trajectories(path, steps=steps, dump_mode=dump_mode)
    summary = summarize(traj, seed=seed, bin_width=bin_width, n_boot=n_boot, source=str(path))
    prepare_output(out, command="diagnose", overwrite=overwrite)
    figs = _figures(out, summary)
    summary.pop("_stats")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.md", _markdown(summary, figs))
    atomic_write_text(out / "report.html", _html(summary, figs, out))
    return summary
