"""``python -m ctpo_lab.markov [--out DIR] [--quick] [--seed S] [--overwrite]``: the standard study."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ctpo_lab.cli import ArgumentParser, folder_path, int_at_least, run


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m ctpo_lab.markov", description=__doc__)
    ap.add_argument("--out", type=folder_path, default="outputs/markov_study",
                    help="output folder (default outputs/markov_study)")
    ap.add_argument("--quick", action="store_true", help="small sweep (< 1 minute)")
    ap.add_argument("--seed", type=int_at_least(0), default=0, help="instance seed, an int >= 0 (default 0)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty output folder written by an earlier study")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 2 bad input (one line ``error: <argument>: <expected>``), 130 interrupted."""
    return run(lambda: _main(argv), flags=("out", "seed", "overwrite"), prog="python -m ctpo_lab.markov")


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    from . import study

    cfg = study.StudyConfig.quick(args.seed) if args.quick else study.StudyConfig(seed=args.seed)
    res = study.run_study(cfg, out, overwrite=args.overwrite)
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
