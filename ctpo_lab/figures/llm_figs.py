"""Real-LLM family (``fig1_llm*``): Figure 1 of the paper measured on a real model's trajectories after
k = 1, 4, 15 stale GRPO-style updates (SmolLM2-135M-Instruct offline; ``tiny-random`` with ``--quick`` or when
the SmolLM2 weights cannot be obtained)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pandas as pd

from ctpo_lab.figures.common import cached, save_figure, save_table
from ctpo_lab.stats import format_ci

FAMILY = "llm"


def _collect(model: str, quick: bool, seed: int, cache: Path) -> dict:
    from ctpo_lab.llm.__main__ import QUICK, RunConfig, run

    cfg = RunConfig(model=model, seed=seed, quick=quick, progress=True)
    if quick:
        for k, v in QUICK.items():
            setattr(cfg, k, list(v) if isinstance(v, list) else v)
        cfg.model = model
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "progress")}

    def compute() -> dict:
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        cfg.out = str(cache / f"llm-run-{digest}")
        return run(cfg, overwrite=True)

    return cached(cache, "llm_run", key, compute)


def usable_targets(summary: dict, where: str) -> dict:
    """The targets of an llm run's summary that have results; ``ValueError`` starting ``where`` (e.g.
    ``"--llm-run: DIR"``) and listing each target's error when none has (nothing to plot: say why)."""
    targets = summary.get("targets")
    results = {k: v for k, v in targets.items() if isinstance(v, dict) and "error" not in v} \
        if isinstance(targets, dict) else {}
    if not results:
        errors = "; ".join(f"{k}: {v.get('error')}" for k, v in (targets or {}).items()
                           if isinstance(v, dict)) or "no targets"
        raise ValueError(f"{where} has no target with results to plot ({errors})")
    return results


def _read_run(run_dir: Path) -> tuple[dict, str]:
    """The summary and model of an existing ``python -m ctpo_lab.llm`` output folder."""
    import json

    summary_path, config_path = run_dir / "summary.json", run_dir / "config.json"
    if not summary_path.is_file() or not config_path.is_file():
        raise ValueError(f"llm_run: {run_dir} is not a finished `python -m ctpo_lab.llm` folder (no summary.json)")
    return json.loads(summary_path.read_text()), json.loads(config_path.read_text())["model"]


def make(out: Path, *, quick: bool, seed: int, cache: Path, command: str, model: str | None = None,
         llm_run: Path | None = None) -> list[Path]:
    from ctpo_lab.figures.position import drift_figure, figure1

    model = model or ("tiny-random" if quick else "smollm2")
    note = ""
    try:
        if llm_run is not None:
            summary, model = _read_run(Path(llm_run))
            note = f" (collected by `python -m ctpo_lab.llm` into {llm_run})"
        else:
            summary = _collect(model, quick, seed, cache)
    except (OSError, RuntimeError, SystemExit) as e:
        if model == "tiny-random":
            raise
        print(f"[figures] llm: {model} unavailable ({e}); falling back to tiny-random", file=sys.stderr)
        note = f" ({model} could not be loaded here: {e}; this is the tiny random model.)"
        model = "tiny-random"
        summary = _collect(model, True, seed, cache)
    results = usable_targets(summary, f"llm_run: {llm_run}" if llm_run is not None else f"llm: the {model} run")
    bin_width = int(summary["settings"]["bin_width"])
    common = {"command": command, "seeds": seed, "extra": {"model": model}}
    files: list[Path] = []
    rows = []
    for name, r in results.items():
        cr = r["clip_rates"]
        rows.append({"target": name, "sigma_hat": r["sigma_hat"], "exponent": r["exponent"],
                     "exponent CI low": r["exponent_ci"][0], "exponent CI high": r["exponent_ci"][1],
                     "drift per token": r["drift_per_token"], "clip rate fixed [0.5, 5]": cr["fixed_window"]["overall"],
                     "clip rate √t window": cr["sqrt_t_window"]["overall"], "sequences": r["n_sequences"]})
    table = pd.DataFrame(rows)
    if rows:
        desc = "; ".join(f"{r['target']}: σ̂ = {r['sigma_hat']:.4f}, β = "
                         + format_ci(r["exponent"], r["exponent CI low"], r["exponent CI high"], 2, style="f")
                         for r in rows)
        files += save_table(table, out, "fig1_llm_summary",
                            finding=f"Figure-1 statistics of {model} after k stale updates: {desc}.{note}", **common)
        fig = figure1(results, bin_width, title=f"{model}: spread of $L_t$ and clip rate by position")
        files += save_figure(fig, out, "fig1_llm",
                             finding=f"Figure 1 on {model}: std of L_t by position with the paper's σ̂√t fit and the "
                             "free-exponent fit (CI by cluster bootstrap), and the advantage-aware clip rate of the "
                             f"fixed window [0.5, 5] vs the √t window, for k stale updates.{note}", **common)
        fig = drift_figure(results, title=f"{model}: drift of $L_t$")
        files += save_figure(fig, out, "fig1_llm_drift",
                             finding=f"Drift of L_t on {model}: mean L_t by position (negative, growing with t, as "
                             f"E_μ L_t = −Σ KL(μ‖π) predicts) and −Σ KL where the producer knows it.{note}", **common)
    return files
