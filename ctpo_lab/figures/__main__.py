"""``python -m ctpo_lab.figures [--quick] [--out DIR] [--seed S] [--only FAMILY ...] [--refresh]``

Regenerates every figure and table of the committed gallery ``paper_figures/`` (or of ``--out``): the
exact-laboratory family (``markov_*``), the real-LLM Figure 1 (``fig1_llm*``), the real-LLM estimator bias and
variance against an on-policy reference (``llm_bias_*``, ``llm_ratio_profiles``), and the training families
(``fig2_*``, ``table2_*``, ``table3_*``, ``fig1_trainer*``) and the regime map (``regime_map*``, from a cached
study of ``python -m ctpo_lab.train regime``, ``--regime``, default ``$CTPO_LAB_CACHE/regime/cpu``).  Results
whose inputs (configuration and ctpo_lab source) are unchanged are reused from ``<out>/.cache``; ``--refresh``
recomputes them.

``--quick`` is the CI-sized run; it writes to ``outputs/figures-quick`` unless ``--out`` says otherwise, and never
into the gallery.  Writing the gallery needs the full inputs of the families asked for: ``--llm-run`` (a finished
``python -m ctpo_lab.llm`` folder), ``--llm-bias`` (a finished ``python -m ctpo_lab.llm bias`` folder) and an
existing grid (``--grid``, default ``runs/main`` from ``python -m ctpo_lab.train``).  A ``--grid``,
``--llm-run`` or ``--llm-bias`` path must exist and be what it claims before anything runs: a given ``--grid`` is
aggregated as it is, never run.  The output folder is locked while the command runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from ctpo_lab.cli import ArgumentParser, folder_path, int_at_least, run

FAMILIES = ("markov", "llm", "llm_bias", "training", "regime")
#: The committed gallery (written only on purpose, with the full inputs).
GALLERY = Path(__file__).resolve().parents[2] / "paper_figures"
QUICK_OUT = "outputs/figures-quick"


def _is_gallery(out: Path) -> bool:
    return os.path.realpath(out) == os.path.realpath(GALLERY)


def check_inputs(args: argparse.Namespace) -> None:
    """Every input path exists and is what it claims, and the gallery gets full inputs; before any work."""
    from ctpo_lab.runsafety import read_json

    def folder(flag: str, value: str, files: tuple[str, ...], what: str) -> None:
        p = Path(value)
        if not p.is_dir():
            raise ValueError(f"{flag}: {p} does not exist or is not a folder (expected {what})")
        missing = [f for f in files if not (p / f).is_file()]
        if missing:
            raise ValueError(f"{flag}: {p} is not {what} (no {', '.join(missing)})")
        for f in files:
            if f.endswith(".json"):
                read_json(p / f, name=flag)

    if not str(args.out).strip():
        raise ValueError("--out: expected a folder path, got ''")
    if args.llm_model is not None and not args.llm_model.strip():
        raise ValueError("--llm-model: expected a model name or folder, got ''")
    if args.llm_model is not None and args.llm_run is not None:
        raise ValueError("--llm-model: the fig1_llm family uses the model of the --llm-run folder; give one of them")
    if args.llm_run is not None:
        folder("--llm-run", args.llm_run, ("summary.json", "config.json"),
               "a finished `python -m ctpo_lab.llm` folder")
        from ctpo_lab.figures.llm_figs import usable_targets

        usable_targets(read_json(Path(args.llm_run) / "summary.json", name="--llm-run"), f"--llm-run: {args.llm_run}")
    if args.llm_bias is not None:
        folder("--llm-bias", args.llm_bias, ("table.csv", "config.json", "summary.json"),
               "a finished `python -m ctpo_lab.llm bias` folder")
    if args.grid is not None:
        folder("--grid", args.grid, ("grid.json",), "a grid folder of `python -m ctpo_lab.train compare`")
        from ctpo_lab import compare

        # grid.json a grid specification, every run's log readable with numbers where numbers belong (a finished
        # run's log present and non-empty), before --out or any file is written
        compare.load_grid(args.grid, name="--grid")
        if "training" in args.only:  # the training family writes its aggregates into a grid folder ctpo_lab made
            from ctpo_lab.runsafety import prepare_output

            prepare_output(args.grid, command="python -m ctpo_lab.figures", resume=True, name="--grid",
                           owners=("python -m ctpo_lab.train compare",), check_only=True)
    if "regime" in args.only and (args.regime is not None or not args.quick):
        from ctpo_lab.train import regime

        if args.regime is not None:
            folder("--regime", args.regime, (regime.STUDY_FILE,), "a study folder of `python -m ctpo_lab.train regime`")
        study = Path(args.regime) if args.regime is not None else regime.default_out("cpu")
        if not (study / regime.STUDY_FILE).is_file():
            raise ValueError(f"--regime: {study} holds no regime study (no {regime.STUDY_FILE}); run "
                             "`python -m ctpo_lab.train regime` first, pass --regime, or leave the family out with "
                             "--only")
        # regime.json well-formed and every finished run readable (the map is drawn from them), before any work
        regime.check_study(study, name="--regime")
    out = Path(args.out)
    if _is_gallery(out):
        if args.quick:
            raise ValueError(f"--out: {out} is the committed gallery; --quick results go to {QUICK_OUT} (the "
                             "default) or another --out")
        needs = {"llm": ("--llm-run", args.llm_run), "llm_bias": ("--llm-bias", args.llm_bias)}
        for family, (flag, value) in needs.items():
            if family in args.only and value is None:
                raise ValueError(f"{flag}: regenerating the gallery {out} needs the full run's folder (see the "
                                 "README's Reproduce section), or leave the family out with --only")
        if "training" in args.only and args.grid is None:
            from ctpo_lab.train.main_job import MAIN_JOB

            default = Path(MAIN_JOB.out)
            if not (default / "grid.json").is_file():
                raise ValueError(f"--grid: regenerating the gallery {out} needs a finished grid; {default} has none "
                                 "(run `python -m ctpo_lab.train` first, or pass --grid)")
        if "regime" in args.only and args.regime is None:
            from ctpo_lab.train.regime import STUDY_FILE, default_out

            if not (default_out("cpu") / STUDY_FILE).is_file():
                raise ValueError(f"--regime: regenerating the gallery {out} needs the regime study; "
                                 f"{default_out('cpu')} has none (run `python -m ctpo_lab.train regime` first, "
                                 "pass --regime, or leave the family out with --only)")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 2 bad input (one line ``error: <argument>: <expected>``), 130 interrupted."""
    return run(lambda: _main(argv), flags=("out", "seed", "grid", "llm_run", "llm_bias", "regime"),
               prog="python -m ctpo_lab.figures")


def _main(argv: list[str] | None) -> int:
    ap = ArgumentParser(prog="python -m ctpo_lab.figures", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="CI-sized run (tiny models, small grids)")
    ap.add_argument("--out", type=folder_path, default=None,
                    help=f"output folder (default paper_figures, {QUICK_OUT} with --quick)")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--only", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="families to make")
    ap.add_argument("--refresh", action="store_true", help="ignore cached results")
    ap.add_argument("--llm-model", default=None, help="model of the fig1_llm family (default smollm2, "
                    "tiny-random with --quick)")
    ap.add_argument("--llm-run", default=None, help="reuse the output folder of an earlier "
                    "`python -m ctpo_lab.llm` run for the fig1_llm family instead of collecting again")
    ap.add_argument("--llm-bias", default=None, help="reuse the output folder of an earlier "
                    "`python -m ctpo_lab.llm bias` run for the llm_bias family instead of measuring again")
    ap.add_argument("--grid", default=None, help="grid folder of the training family (default runs/main, "
                    "the output of `python -m ctpo_lab.train`; a cached tiny grid with --quick)")
    ap.add_argument("--regime", default=None, help="study folder of the regime family (default "
                    "$CTPO_LAB_CACHE/regime/cpu, the output of `python -m ctpo_lab.train regime`; a cached tiny "
                    "study with --quick)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else str(GALLERY if GALLERY.is_dir() else "paper_figures")
    check_inputs(args)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from ctpo_lab.figures.common import apply_style
    from ctpo_lab.runsafety import prepare_output

    apply_style()
    out = Path(args.out)
    # the repository's own gallery is updated in place; any other folder only when figures created it
    gallery = _is_gallery(out)
    prepare_output(out, command="python -m ctpo_lab.figures", existing="update" if gallery else "update-own",
                   resumable=False)  # one writer; files replaced
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
        elif family == "regime":
            from ctpo_lab.figures import regime_figs

            written[family] = regime_figs.make(out, quick=args.quick, seed=args.seed, cache=cache, command=command,
                                               study_dir=Path(args.regime) if args.regime else None)
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
