"""``python -m ctpo_lab.markov [--out DIR] [--quick] [--seed S] [--overwrite]``: the standard study."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctpo_lab.markov", description=__doc__)
    ap.add_argument("--out", default="outputs/markov_study", help="output folder (default outputs/markov_study)")
    ap.add_argument("--quick", action="store_true", help="small sweep (< 1 minute)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output folder")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        print(f"error: output folder {out} exists and is not empty; pass --overwrite", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    from . import plots, study

    cfg = study.StudyConfig.quick(args.seed) if args.quick else study.StudyConfig(seed=args.seed)
    t0 = time.time()
    n_sweep = len(cfg.kls) * sum(
        1 for T in cfg.horizons for s in cfg.signals for e in cfg.estimators if study.sweep_cell_applies(cfg, e, s, T))
    n_rep = len(study.REPRODUCTIONS) + 1
    with tqdm(total=n_sweep + n_rep + 2, desc="markov study", unit="step") as bar:
        def rep_progress(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update(1)

        rep, clip = study.reproductions(cfg, rep_progress)
        bar.set_postfix_str("sweep")
        sw = study.sweep(cfg, lambda: bar.update(1))
        bar.set_postfix_str("profiles")
        prof = study.profiles(cfg)
        bar.update(1)
        clip_df = pd.DataFrame(clip)
        rep.to_csv(out / "reproductions.csv", index=False)
        sw.to_csv(out / "sweep.csv", index=False)
        prof.to_csv(out / "profiles.csv", index=False)
        clip_df.to_csv(out / "clip_profiles.csv", index=False)
        bar.set_postfix_str("figures")
        figs = plots.plot_bias_variance(sw, out) + plots.plot_variance_ratio(prof, out)
        figs += plots.plot_position_profiles(clip_df, out)
        bar.update(1)
    elapsed = time.time() - t0
    pd.set_option("display.width", 200)
    pd.set_option("display.max_colwidth", 60)
    kl = sorted(sw["kl"].unique())[len(sw["kl"].unique()) // 2]
    T = max(sw["T"])
    tab = sw[(sw["kl"] == kl) & (sw["T"] == T)][["signal", "estimator", "relative_bias", "cosine", "trace_cov",
                                                   "mse_N64"]]
    print(f"\nExact moments at T={T}, per-token KL={kl} (V={cfg.vocab_size}, k={cfg.order}):")
    print(tab.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print("\nReproductions:")
    print(rep[["fact", "value", "expected", "holds"]].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    checked = rep[rep["holds"].notna()]
    print(f"\n{int(checked['holds'].astype(bool).sum())}/{len(checked)} reproductions hold "
          f"({len(rep) - len(checked)} informational rows); wrote {len(figs)} figure files and 4 CSVs "
          f"to {out} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
