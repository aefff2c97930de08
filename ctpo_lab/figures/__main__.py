"""``python -m ctpo_lab.figures [--quick] [--out DIR] [--seed S] [--only FAMILY ...] [--refresh]``

Regenerates every figure and table of ``paper_figures/`` (or ``--out``): the exact-laboratory family
(``markov_*``), the real-LLM Figure 1 (``fig1_llm*``), the real-LLM estimator bias and variance against an
on-policy reference (``llm_bias_*``, ``llm_ratio_profiles``), and the training families (``fig2_*``, ``table2_*``,
``table3_*``, ``fig1_trainer*``).  Results whose inputs (configuration and ctpo_lab source) are unchanged are
reused from ``<out>/.cache``; ``--refresh`` recomputes them.  ``--quick`` is the CI-sized run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

FAMILIES = ("markov", "llm", "llm_bias", "training")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctpo_lab.figures", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="CI-sized run (tiny models, small grids)")
    ap.add_argument("--out", default="paper_figures", help="output folder (default paper_figures)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="families to make")
    ap.add_argument("--refresh", action="store_true", help="ignore cached results")
    ap.add_argument("--llm-model", default=None, help="model of the fig1_llm family (default smollm2, "
                    "tiny-random with --quick)")
    ap.add_argument("--llm-run", default=None, help="reuse the output folder of an earlier "
                    "`python -m ctpo_lab.llm` run for the fig1_llm family instead of collecting again")
    ap.add_argument("--llm-bias", default=None, help="reuse the output folder of an earlier "
                    "`python -m ctpo_lab.llm bias` run for the llm_bias family instead of measuring again")
    ap.add_argument("--grid", default=None, help="grid folder of the training family (default runs/compare-cpu, "
                    "the output of `python -m ctpo_lab.train`; a cached tiny grid with --quick)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from ctpo_lab.figures.common import apply_style

    apply_style()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / ".cache"
    if args.refresh and cache.exists():
        import shutil

        shutil.rmtree(cache)
    command = "python -m ctpo_lab.figures " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    written: dict[str, list[Path]] = {}
    for family in args.only:
        start = time.time()
        print(f"[figures] {family} ...", file=sys.stderr, flush=True)
        if family == "markov":
            from ctpo_lab.figures import markov_figs

            written[family] = markov_figs.make(out, quick=args.quick, seed=args.seed, cache=cache, command=command)
        elif family == "llm":
            from ctpo_lab.figures import llm_figs

            written[family] = llm_figs.make(out, quick=args.quick, seed=args.seed, cache=cache, command=command,
                                            model=args.llm_model,
                                            llm_run=Path(args.llm_run) if args.llm_run else None)
        elif family == "llm_bias":
            from ctpo_lab.figures import llm_bias_figs

            written[family] = llm_bias_figs.make(out, quick=args.quick, seed=args.seed, cache=cache, command=command,
                                                 model=args.llm_model,
                                                 bias_run=Path(args.llm_bias) if args.llm_bias else None)
        else:
            from ctpo_lab.figures import training_figs

            written[family] = training_figs.make(out, quick=args.quick, seed=args.seed, cache=cache,
                                                 command=command, grid_dir=Path(args.grid) if args.grid else None)
        print(f"[figures] {family}: {len(written[family])} files in {time.time() - start:.0f} s", file=sys.stderr)
    for family, files in written.items():
        names = sorted({p.name.split(".")[0] for p in files})
        print(f"{family}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
