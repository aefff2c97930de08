"""The regime family: ``regime_map.csv`` (one row per (cell, loss): final held-out accuracy with a 95% bootstrap
CI over seeds, collapse rate, paired sign-flip p against GRPO), ``regime_map_detail.csv`` (AUC, clip fraction,
measured KL and length, the exact chain's prediction at that KL and length), ``regime_runs.csv`` (every run's
outcomes) and ``regime_map.png`` (the losses ranked per cell), from a cached study of
``python -m ctpo_lab.train regime`` (:mod:`ctpo_lab.train.regime`).

The full run reads the study in ``--regime`` (default ``$CTPO_LAB_CACHE/regime/cpu``) as it is: nothing is
trained because of a path. ``--quick`` runs (or reuses) the tiny study (2 cells × 2 losses × 2 seeds of
cpu-tiny-sized runs) in ``<out>/.cache/regime-quick``.
"""

from __future__ import annotations

from pathlib import Path

FAMILY = "regime"


def make(out: Path, *, quick: bool, seed: int, cache: Path, command: str, study_dir: Path | None = None
         ) -> list[Path]:
    from ctpo_lab.figures.common import save_figure, save_table
    from ctpo_lab.train import regime

    if quick and study_dir is None:
        study_dir = cache / "regime-quick"
        regime.run_study(study_dir, preset="tiny", seeds=(seed, seed + 1), resume=True, progress=False)
    elif study_dir is None:
        study_dir = regime.default_out("cpu")
    study_dir = Path(study_dir)
    if not (study_dir / regime.STUDY_FILE).is_file():
        raise ValueError(f"regime: {study_dir} holds no regime study (no {regime.STUDY_FILE}); run "
                         "`python -m ctpo_lab.train regime` first, or pass --regime")
    result = regime.summarize_study(study_dir, prediction_cache=cache / "regime-prediction", name="regime",
                                    warn=quick)  # (the command line has named unfinished runs in its checks)
    m, detail = result["map"], result["detail"]
    if m.empty:
        raise ValueError(f"regime: {study_dir} has no finished runs yet (continue it with "
                         "`python -m ctpo_lab.train regime --resume`)")
    seeds = sorted(set(result["runs"]["seed"]))
    common = {"command": command, "seeds": seeds, "extra": {"study": str(study_dir)}}
    sig = m[m["p_vs_grpo"] < 0.05]
    if sig.empty:
        verdict = "no loss differs from GRPO with paired sign-flip p < 0.05 in any cell"
    else:
        verdict = "p < 0.05 vs GRPO: " + "; ".join(
            f"{r.cell} {r.loss} ({r.final_accuracy:.3f} vs GRPO, p = {r.p_vs_grpo:.4f})" for r in sig.itertuples())
    note = (" CI-sized structural study (a tiny model, 3 steps): its numbers say nothing about the estimators."
            if quick else "")
    files = save_table(m, out, "regime_map", finding="The regime map: final held-out accuracy per (cell, loss), "
                       "mean [95% bootstrap CI] over paired seeds, collapse rate (accuracy ≥ 0.2 below the run's "
                       "best at the end, or a non-finite update) and the exact two-sided sign-flip p-value of the "
                       f"seed-paired difference against GRPO; {verdict}.{note}", **common)
    files += save_table(detail, out, "regime_map_detail",
                        finding="Per (cell, loss): area under the held-out accuracy curve (mean accuracy over "
                        "training), paired difference vs GRPO with a bootstrap CI, mean clip fraction, measured "
                        "per-token KL(μ‖π after the last update) and response length, and the exact chain's "
                        "relative bias and variance ratio at the cell's measured KL and length "
                        "(ctpo_lab.markov.matched_chain_prediction, median of 3 random chains; the window "
                        f"estimators at horizon ≤ 16).{note}", **common)
    files += save_table(result["runs"], out, "regime_runs",
                        finding="Every finished run of the study, one row per (cell, loss, seed): final, best and "
                        "area-under-curve held-out accuracy, collapse, non-finite updates, mean clip fraction, "
                        "measured per-token KL, response length and wall time (machine-dependent: CPU float "
                        f"results differ between processors).{note}", **common)
    fig = regime.plot_regime_map(m, detail)
    files += save_figure(fig, out, "regime_map",
                         finding="Estimators ranked by final held-out accuracy in each cell (mean and 95% "
                         "bootstrap CI over paired seeds; dashed: GRPO; filled and starred: paired sign-flip "
                         f"p < 0.05 against GRPO); {verdict}.{note}", **common)
    return files
