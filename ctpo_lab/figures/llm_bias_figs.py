"""Real-LLM estimator bias family (``llm_bias_*``): bias and variance of the bare token, cumulative, sequence and
sequence geo-mean weights (``unclipped_*`` presets) and of the clipped presets (grpo, gspo, ctpo, ctpo_fixed)
against an on-policy reference sampled from π itself, per source of off-policyness, with the exact laboratory's
prediction for a chain of matching per-token KL (:mod:`ctpo_lab.llm.bias_run`). Run folders written with the
earlier estimator names are read through :data:`ctpo_lab.llm.bias_run.LEGACY_NAMES`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pandas as pd

from ctpo_lab.figures.common import cached, caption_text, save_table
from ctpo_lab.llm.bias_run import display_table, is_legacy, rename_legacy

FAMILY = "llm_bias"

#: the CI-sized configuration of ``--quick`` (tiny random model, ≈ 30 s)
QUICK_OVERRIDES = dict(model="tiny-random", train_prompts=4, eval_prompts=8, group_size=3, max_new_tokens=24,
                       k=[1, 4], lr=1e-3, minibatches=4, directions=4, params="last:2", n_boot=100, chain_seeds=2,
                       chain_max_horizon=12, threads=2)


def _collect(model: str, quick: bool, seed: int, cache: Path) -> Path:
    from ctpo_lab.llm.bias_run import QUICK, BiasConfig, run_bias

    cfg = BiasConfig(model=model, seed=seed, quick=quick, progress=True)
    if quick:
        for k, v in {**QUICK, **QUICK_OVERRIDES}.items():
            setattr(cfg, k, list(v) if isinstance(v, list) else v)
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "progress")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    run_dir = cache / f"llm-bias-{digest}"

    def compute() -> str:
        cfg.out = str(run_dir)
        run_bias(cfg, overwrite=True)
        return str(run_dir)

    path = Path(cached(cache, "llm_bias_run", key, compute))
    if not (path / "table.csv").is_file():  # the cache entry outlived its folder: recompute
        path = Path(cached(cache, "llm_bias_run", key, compute, refresh=True))
    return path


def make(out: Path, *, quick: bool, seed: int, cache: Path, command: str, model: str | None = None,
         bias_run: Path | None = None) -> list[Path]:
    from ctpo_lab.llm.bias_plots import plot_bias_variance, plot_ratio_profiles

    model = model or ("tiny-random" if quick else "smollm2")
    note = ""
    if bias_run is not None:
        run_dir = Path(bias_run)
        if not (run_dir / "table.csv").is_file() or not (run_dir / "config.json").is_file():
            raise ValueError(f"llm_bias_run: {run_dir} is not a finished `python -m ctpo_lab.llm bias` folder")
        model = json.loads((run_dir / "config.json").read_text())["model"]
        note = f" (measured by `python -m ctpo_lab.llm bias` into {run_dir})"
    else:
        run_dir = _collect(model, quick, seed, cache)
    cfg = json.loads((run_dir / "config.json").read_text())
    table = pd.read_csv(run_dir / "table.csv")
    legacy = is_legacy(table)  # a folder of the earlier estimator names: its prediction uses them too
    table = rename_legacy(table, legacy)
    pred_path = run_dir / "prediction_summary.csv"
    prediction = (rename_legacy(pd.read_csv(pred_path), legacy)
                  if pred_path.is_file() and pred_path.stat().st_size > 1 else None)
    profiles = rename_legacy(pd.read_csv(run_dir / "ratio_profiles.csv"))
    extra = {"model": model, "prompts": f"{cfg['eval_prompts']} × G={cfg['group_size']}",
             "directions": f"K={cfg['directions']} on {cfg['params']}", "advantage": cfg["advantage"]}
    files: list[Path] = []
    files += save_table(display_table(table, prediction), out, "llm_bias_table", command=command, seeds=seed,
                        extra=extra, finding=f"Estimator bias and variance on {model} against on-policy samples of "
                        f"π, per source of off-policyness, with the exact chain's prediction at the same per-token "
                        f"KL.{note}")
    figs = plot_bias_variance(table, prediction, out, name="llm_bias_noise_variance", y="bias_to_noise")
    figs += plot_bias_variance(table, prediction, out, name="llm_bias_variance")
    figs += plot_ratio_profiles(profiles, out, name="llm_ratio_profiles")
    captions = {
        "llm_bias_noise_variance": f"Squared bias ‖E X − g‖² in units of the on-policy reference's variance per "
                                   f"prompt group (noise-corrected, symmetric-log axis: estimates below 0 are "
                                   f"noise) against the variance ratio, per estimator on {model} (filled, 95% "
                                   f"bootstrap CIs) and for the exact chain at the same per-token KL (hollow).{note}",
        "llm_bias_variance": f"Relative bias ‖E X − g‖/‖g‖ against the variance ratio tr Cov/tr Cov_ref of each "
                             f"estimator on {model} (filled, 95% bootstrap CIs over prompts and directions) and "
                             f"the exact chain at the same per-token KL (hollow, range over instances).{note}",
        "llm_ratio_profiles": f"E_μ of the cumulative, token and sequence geo-mean (GSPO) weights by position "
                              f"(prompt-cluster CIs; E_μ ρ_1:t = 1 checks sampling and scoring) and their normalised "
                              f"ESS on {model}.{note}",
    }
    for name, finding in captions.items():
        cap = out / f"{name}.caption.txt"
        cap.write_text(caption_text(finding, command, seed, extra))
        files.append(cap)
    return files + list(figs)
