"""``python -m ctpo_lab.markov [--out DIR] [--quick] [--seed S] [--overwrite]``: the standard study."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctpo_lab.markov", description=__doc__)
    ap.add_argument("--out", default="outputs/markov_study", help="output folder (default outputs/markov_study)")
    ap.add_argument("--quick", action="store_true", help="small sweep (< 1 minute)")
    ap.add_argument("--seed", type=int, default=0, help="instance seed, an int >= 0 (default 0)")
    ap.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output folder")
    args = ap.parse_args(argv)
    if args.seed < 0:
        print(f"error: --seed: expected an int >= 0, got {args.seed}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        print(f"error: --out: output folder {out} exists and is not empty; pass --overwrite", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out: cannot create the output folder {out} ({e.strerror or e})", file=sys.stderr)
        return 2
    from . import study

    cfg = study.StudyConfig.quick(args.seed) if args.quick else study.StudyConfig(seed=args.seed)
    try:
        res = study.run_study(cfg, out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep, sw = res.reproductions, res.sweep
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
          f"({len(rep) - len(checked)} informational rows); wrote {len(res.files)} figure files and 4 CSVs "
          f"to {out} in {res.elapsed_s:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
