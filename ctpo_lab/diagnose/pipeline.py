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
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctpo_lab import analysis, losses, stats
from ctpo_lab.analysis import finite_or_none
from ctpo_lab.diagnose import clip, readers
from ctpo_lab.llm.limits import MAX_CHAIN_SEEDS, check_bin_width, check_boot, finite_json, longest_response
from ctpo_lab.losses import FIGURE1_WINDOWS
from ctpo_lab.runsafety import atomic_path, atomic_write_text, prepare_output

__all__ = ["FIGURE_PRESETS", "diagnose", "summarize", "recommend", "chain_prediction"]

#: presets drawn in the clip-rate-by-position figure (every preset of ``losses.PRESETS`` is in summary.json)
FIGURE_PRESETS = tuple(losses.TRAINING_PRESETS) + FIGURE1_WINDOWS

#: an exponent this close to 0.5 (or 0) takes the preset's own window rather than a fitted clip_exponent
_EXPONENT_TOLERANCE = 0.1

KL_ESTIMATOR = ("k3: mean over valid tokens of e^ℓ − 1 − ℓ, ℓ = log π − log μ (unbiased for KL(μ‖π) under μ "
                "and never negative)")



def summarize(traj: readers.Trajectories, *, seed: int = 0, bin_width: int = 50, n_boot: int = 1000,
              source: str = "", target_clip_rate: float = clip.DEFAULT_TARGET_CLIP_RATE,
              chain_seeds: int = 1) -> dict[str, Any]:
    """The JSON-ready summary of ``traj`` (see :func:`diagnose`)."""
    m = traj.mask
    ell = traj.log_ratio
    v = ell[m]
    min_count = max(2, min(30, int(m.sum(axis=0).max()) // 2))
    try:
        st = analysis.trajectory_statistics(
            ell, m, traj.advantages, traj.groups, traj.kl, bin_width=bin_width, min_count=min_count,
            min_sequences=min(10, max(2, int(m.shape[0]) // 2)), n_boot=n_boot, seed=seed,
            windows=FIGURE1_WINDOWS)
    except ValueError as e:
        raise ValueError(f"path: too little data for the √t fit ({e})") from None
    if st["sigma_hat"] is None or not math.isfinite(st["sigma_hat"]):
        raise ValueError(f"bin_width: σ̂ is undefined with bins of {bin_width} positions (no bin holds "
                         f"{min_count} or more tokens with its centre at a position ≤ 5000); use a smaller "
                         "bin width")
    aware = traj.advantages is not None
    rates = clip.clip_rates(ell, m, traj.advantages, list(losses.PRESETS), bin_width=bin_width,
                            min_count=min_count)
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
        "clip_rate_kind": ("advantage-aware: the fraction of the valid tokens with A ≠ 0 whose gradient the "
                           "preset's loss sets to zero" if aware else
                           "per sign of the advantage (no advantages in the input): the fraction of the valid "
                           "tokens whose gradient the preset's loss sets to zero with A = +1, and with A = −1"),
        "clip_rate": rates["overall"],
        "clip_rate_by_position": {"bin_center": rates["bin_center"], "rate": rates["by_bin"]},
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
    out["recommendation"] = recommend(traj, out, target_clip_rate=target_clip_rate, seed=seed)
    out["chain_prediction"] = chain_prediction(out["kl_per_token"], out["mean_length"], seeds=chain_seeds,
                                               seed=seed)
    out["_stats"] = st  # for the figures; dropped before writing
    return out


def recommend(traj: readers.Trajectories, summary: dict[str, Any], *,
              target_clip_rate: float = clip.DEFAULT_TARGET_CLIP_RATE, seed: int = 0) -> dict[str, Any]:
    """The preset whose window grows like the run's sd(L_t), with thresholds calibrated to a target clip rate.

    The √t fit's exponent β picks the window: its CI contains 0.5 → ``ctpo`` (window ∝ √t); else contains 0 →
    ``ctpo_fixed``; else ``ctpo`` with ``clip_exponent = β``.  Its ``eps_low``/``eps_high`` (and the log-space
    dual bound) are scaled together until the clip rate on this run is ``target_clip_rate``
    (:func:`ctpo_lab.diagnose.clip.calibrate`); the other training presets are calibrated the same way for
    comparison (``calibrated``; None where the clip cannot reach the target or never drops a gradient).
    """
    beta, (lo, hi) = summary["exponent"], summary["exponent_ci"]
    reasons, overrides = [], {}
    known = all(v is not None and math.isfinite(v) for v in (beta, lo, hi))
    if known and (lo <= 0.5 <= hi or abs(beta - 0.5) <= _EXPONENT_TOLERANCE):
        preset = "ctpo"
        reasons.append(f"sd(L_t) grows like √t (exponent {beta:.2f}, CI [{lo:.2f}, {hi:.2f}], within "
                       f"{_EXPONENT_TOLERANCE} of 0.5): a log window ∝ √t clips about the same fraction at every "
                       "position")
    elif known and (lo <= 0.0 <= hi or abs(beta) <= _EXPONENT_TOLERANCE):
        preset = "ctpo_fixed"
        reasons.append(f"sd(L_t) does not grow with t (exponent CI [{lo:.2f}, {hi:.2f}] contains 0): a fixed log "
                       "window on L_t fits")
    elif known:
        preset = "ctpo"
        overrides["clip_exponent"] = round(float(beta), 2)
        reasons.append(f"sd(L_t) grows like t^{beta:.2f} (CI [{lo:.2f}, {hi:.2f}], far from 0.5 and 0): the log "
                       f"window uses clip_exponent = {beta:.2f}")
    else:
        preset = "ctpo"
        reasons.append("the growth exponent could not be estimated; the √t window is the default")
    cal = clip.calibrate(traj.log_ratio, traj.mask, traj.advantages, preset, target_clip_rate, seed=seed,
                         **overrides)
    calibrated = {}
    for name in losses.TRAINING_PRESETS:
        calibrated[name] = (cal if name == preset and not overrides else
                            clip.calibrate(traj.log_ratio, traj.mask, traj.advantages, name, target_clip_rate,
                                           seed=seed))
    rates = summary["clip_rate"]

    def shown(name: str) -> str:
        r = rates[name]
        return (f"{100 * r:.2g}%" if isinstance(r, float)
                else f"{100 * r['positive']:.2g}% (A > 0) / {100 * r['negative']:.2g}% (A < 0)")

    reasons.append(f"at their default thresholds grpo clips {shown('grpo')}, gspo {shown('gspo')} and "
                   f"{preset} {shown(preset)} of the tokens on this run")
    if cal is not None:
        reasons.append(f"scaling {preset}'s window by {cal['scale']:.3g} clips {100 * cal['clip_rate']:.2g}% "
                       f"(target {100 * target_clip_rate:.2g}%)" + ("" if cal["reached"] else
                                                                    ": the target is not reached"))
    if summary["lossy"]:
        reasons.append("the input is lossy (weights at a cap): the calibration underestimates large ratios")
    thresholds = None if cal is None else {k: v for k, v in cal.items() if k not in ("scale", "reached")}
    return {"preset": preset, "overrides": overrides, "thresholds": thresholds,
            "target_clip_rate": target_clip_rate, "reasons": reasons, "calibrated": calibrated}


def chain_prediction(kl: float | None, length: float, *, seeds: int = 1, seed: int = 0,
                     max_horizon: int = 256, clipped_max_horizon: int = 8) -> dict[str, Any] | None:
    """The exact chain's bias and variance of every preset at the run's per-token KL and mean length
    (:func:`ctpo_lab.markov.matched_chain_prediction`; ``seeds`` random chains, mean over them).

    Window presets that need the (z, L) state are computed at ``clipped_max_horizon`` (the ``horizon`` column);
    the horizon is capped at ``max_horizon``.  None when ``seeds`` is 0 or the KL is unknown.
    """
    if seeds < 1 or kl is None or not math.isfinite(kl):
        return None
    from ctpo_lab.markov import matched_chain_prediction

    horizon = int(min(max_horizon, max(1, round(length))))
    kw = dict(seeds=tuple(range(seed, seed + seeds)), clipped_max_horizon=min(clipped_max_horizon, horizon))
    rows: dict[str, Any] = {}
    try:  # one call: the chains are built once for every preset
        frames = {"all": matched_chain_prediction(max(0.0, float(kl)), horizon, estimators=list(losses.PRESETS),
                                                  **kw)}
    except (ValueError, NotImplementedError):  # some preset the chain cannot compile: one at a time
        frames = {}
        for name in losses.PRESETS:
            try:
                frames[name] = matched_chain_prediction(max(0.0, float(kl)), horizon, estimators=[name], **kw)
            except (ValueError, NotImplementedError) as e:
                rows[name] = {"error": " ".join(str(e).split())[:200]}
    for df in frames.values():
        for name, g in df.groupby("estimator", sort=False):
            rows[str(name)] = {k: finite_or_none(float(g[k].mean())) for k in
                               ("relative_bias", "cosine", "var_ratio", "rel_mse")}
            rows[str(name)]["horizon"] = int(g["horizon"].iloc[0])
    return {"kl": float(kl), "horizon": horizon, "seeds": seeds, "estimators": rows}


def _figures(out: Path, summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Write the PNGs; [(file name, caption)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctpo_lab.figures.position import clip_ess_figure, drift_figure, figure1

    st = summary["_stats"]
    name = "run"
    pos = summary["clip_rate_by_position"]
    clip_view = {"bin_center": pos["bin_center"], "ess_bin_center": st.get("ess_bin_center"),
                 "ess_by_bin": st.get("ess_by_bin"),
                 "clip_rates": {p: {"by_bin": pos["rate"][p]} for p in FIGURE_PRESETS}}
    presets = [p for p in FIGURE_PRESETS if any(r for r in pos["rate"][p] if r)]  # presets that clip here
    figs = [
        ("figure1.png", "sd(L_t) by position against σ̂√t and the free fit; Figure-1 window clip rates",
         figure1({name: st}, summary["bin_width"])),
        ("drift.png", "mean L_t by position (the drift)", drift_figure({name: st})),
        ("clip_ess.png", "clip rate of each preset by position; ESS by position",
         clip_ess_figure(clip_view, presets or list(FIGURE_PRESETS))),
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
    lo, hi = (math.nan if v is None else v for v in s["exponent_ci"])
    rows = [
        ("format", s["format"]),
        ("steps", ", ".join(map(str, s["steps"])) if s["steps"] else "—"),
        ("sequences / tokens", f"{s['num_sequences']} / {s['num_tokens']} (mean length {s['mean_length']:.1f})"),
        ("KL(μ‖π) per token (k3)", _fmt(s["kl_per_token"])),
        ("−mean ℓ per token (k1)", _fmt(s["kl_per_token_k1"])),
        ("drift per token (mean ℓ)", _fmt(s["drift_per_token"])),
        ("σ̂ (sd L_t ≈ σ̂√t)", f"{_fmt(s['sigma_hat'])} [{_fmt(s['sigma_hat_ci'][0])}, {_fmt(s['sigma_hat_ci'][1])}]"),
        ("free exponent β (sd L_t ∝ t^β)", stats.format_ci(math.nan if s["exponent"] is None else s["exponent"],
                                                           lo, hi, 2, style="f")),
    ]
    if s["kl_per_token_exact"] is not None:
        rows.insert(4, ("exact KL per token", _fmt(s["kl_per_token_exact"])))
    rec = s["recommendation"]
    th = rec["thresholds"]
    rows.append(("recommended preset", rec["preset"] + (f" with {rec['overrides']}" if rec["overrides"] else "")
                 + ("" if th is None else f"; eps_low {th['eps_low']:.4g}, eps_high {th['eps_high']:.4g}"
                    + (f", dual_clip {th['dual_clip']:.4g}" if "dual_clip" in th else "")
                    + f" (clip rate {100 * th['clip_rate']:.2g}%)")))
    rows.append(("lossy input", f"yes: {100 * s['capped_fraction']:.3f}% of the tokens at the cap {s['cap']}"
                 if s["lossy"] else "no"))
    return rows


def _rate_text(r: Any) -> str:
    if isinstance(r, float):
        return f"{100 * r:.3g}%"
    return ", ".join(f"A{'>' if k == 'positive' else '<'}0: {100 * x:.3g}%" for k, x in r.items())


def _tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the per-preset tables: clip rates, calibrated thresholds, chain prediction."""
    s = summary
    cal = s["recommendation"]["calibrated"]
    chain = (s["chain_prediction"] or {}).get("estimators", {})
    rows = []
    for name in losses.PRESETS:
        c = cal.get(name)
        ch = chain.get(name, {})
        rows.append([name, _rate_text(s["clip_rate"][name]),
                     "—" if c is None else f"{c['eps_low']:.4g} / {c['eps_high']:.4g} ({100 * c['clip_rate']:.2g}%)",
                     *(["n/a"] * 3 if "relative_bias" not in ch else
                       [_fmt(ch["relative_bias"], 3), _fmt(ch["var_ratio"], 3), _fmt(ch["rel_mse"], 3)])])
    head = ["preset", "clip rate", f"eps_low / eps_high at {100 * s['recommendation']['target_clip_rate']:.2g}% "
            "clip (achieved)", "chain: relative bias", "chain: variance ratio", "chain: relative MSE"]
    title = "Per preset"
    if s["chain_prediction"]:
        title += (f" (chain prediction at KL/token {s['chain_prediction']['kl']:.3g}, horizon "
                  f"{s['chain_prediction']['horizon']}; window presets at a shorter horizon, see summary.json)")
    return [(title, head, rows)]


def _markdown(summary: dict[str, Any], figs: list[tuple[str, str]]) -> str:
    lines = [f"# Diagnosis of {summary['source']}", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _rows(summary)]
    lines += ["", f"Clip rates: {summary['clip_rate_kind']}. KL estimator: {summary['kl_estimator']}.", ""]
    lines += [f"- {n}" for n in summary["notes"]]
    lines += ["", "## Recommendation", ""] + [f"- {r}" for r in summary["recommendation"]["reasons"]]
    for title, head, rows in _tables(summary):
        lines += ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
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
    parts.append("<h2>Recommendation</h2><ul>" + "".join(f"<li>{e(r)}</li>" for r in
                                                         summary["recommendation"]["reasons"]) + "</ul>")
    for title, head, rows in _tables(summary):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                     + "</table>")
    for fname, caption in figs:
        data = base64.b64encode((out / fname).read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def json_ready(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with every non-finite number written as null, the quantities so replaced listed under
    ``undefined`` and named in ``notes`` (never a NaN in summary.json, never one dropped silently)."""
    clean, undefined = finite_json(summary)
    clean["undefined"] = undefined
    if undefined:
        shown = ", ".join(undefined[:8]) + (f" and {len(undefined) - 8} more" if len(undefined) > 8 else "")
        clean["notes"] = [*clean.get("notes", []), f"undefined on this input (not a finite number; null in "
                                                    f"summary.json): {shown}"]
    return clean


def diagnose(path: str | os.PathLike[str], out: str | os.PathLike[str], *, steps: Sequence[int] | None = None,
             seed: int = 0, dump_mode: str = "cumprod", overwrite: bool = False, bin_width: int = 50,
             n_boot: int = 1000, target_clip_rate: float = clip.DEFAULT_TARGET_CLIP_RATE,
             chain_seeds: int = 1) -> dict[str, Any]:
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
    target_clip_rate : the clip rate the recommended thresholds are calibrated to (in (0, 1)).
    chain_seeds : random chains of the exact prediction (0: none).

    Returns
    -------
    dict with ``format``, ``num_sequences``, ``num_tokens``, ``kl_per_token`` (k3 estimate of KL(μ‖π)),
    ``drift_per_token`` (mean ℓ), ``sigma_hat``, ``exponent``, ``exponent_ci``, ``clip_rate`` ({preset: rate},
    advantage-aware when the input has advantages, per sign otherwise, for every preset of ``losses.PRESETS``),
    ``clip_rate_by_position``, ``recommendation`` (:func:`recommend`), ``chain_prediction``
    (:func:`chain_prediction`), ``lossy``, ``by_position`` (binned sd L_t, mean L_t, ESS) and ``notes``.
    """
    if isinstance(bin_width, bool) or not isinstance(bin_width, int) or bin_width < 1:
        raise ValueError(f"bin_width: expected an int ≥ 1, got {bin_width!r}")
    check_boot(n_boot)
    if not (isinstance(target_clip_rate, (int, float)) and 0 < target_clip_rate < 1):
        raise ValueError(f"target_clip_rate: expected a number in (0, 1), got {target_clip_rate!r}")
    if isinstance(chain_seeds, bool) or not isinstance(chain_seeds, int) or not 0 <= chain_seeds <= MAX_CHAIN_SEEDS:
        raise ValueError(f"chain_seeds: expected an int in [0, {MAX_CHAIN_SEEDS}], got {chain_seeds!r}")
    out = Path(out)
    prepare_output(out, command="diagnose", overwrite=overwrite, check_only=True,  # before any reading
                   resumable=False)
    traj = readers.read_trajectories(path, steps=steps, dump_mode=dump_mode)
    check_bin_width(bin_width, longest_response(traj.mask))  # the input is known, nothing written yet
    summary = summarize(traj, seed=seed, bin_width=bin_width, n_boot=n_boot, source=str(path),
                        target_clip_rate=target_clip_rate, chain_seeds=chain_seeds)
    st = summary.pop("_stats")
    summary = json_ready(summary)
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"  # before any file is written
    prepare_output(out, command="diagnose", overwrite=overwrite, resumable=False)
    figs = _figures(out, {**summary, "_stats": st})
    atomic_write_text(out / "summary.json", text)
    atomic_write_text(out / "report.md", _markdown(summary, figs))
    atomic_write_text(out / "report.html", _html(summary, figs, out))
    return summary
