"""The main job: the paper's four losses on one off-policy cell of the regime map, 20 paired seeds, and a
verdict stated only where the paired test separates two losses.

    python -m ctpo_lab.train                      # the main job on its built-in defaults
    python -m ctpo_lab.train main [--seed S] [--seeds N] [--cell NAME] [--out DIR] [--jobs J] [--overwrite]

Every run is the ``cpu`` study's run of the chosen cell (:mod:`ctpo_lab.train.regime`: the ``cpu`` trainer
preset's 2-layer model, 8 prompts × 8 responses per rollout batch, 16 rollout steps, ``updates_per_rollout``
optimizer updates per batch; the main job adds ratio dumps every 4th step, which read tensors only), so seeds
0–7 of the main job are, on the same machine, the very runs of the committed regime study.  The grid is
:func:`ctpo_lab.compare.run_comparison` (``runs/main/``: Table 2 and 3 analogues, paired tests, the Figure 2
analogue); on top of it, :func:`verdict` compares GRPO with each other
loss and CTPO with CTPO-fixed:

* a difference is **separated** when its paired sign-flip p-value (exact up to 40 seeds), Holm-adjusted over the
  family of comparisons, is below ``alpha`` (0.05) *and* the 95% bootstrap CI of the mean paired difference excludes 0;
* **borderline** when only the unadjusted p is below ``alpha`` (such a call can flip on another machine);
* **not separated** otherwise: the CI says how large a difference the seeds can exclude.

A secondary section of ``verdict.md`` applies the same rule to each run's held-out accuracy averaged over its
evaluations (the regime map's area-under-curve metric, Holm-adjusted over its own comparisons): how fast a loss
learns, where the final accuracy says where it ends.

Across machines: CPU float results differ between processors (torch dispatches its kernels by instruction
set), so every run's numbers differ from machine to machine from the warm start on, and the verdict guards
against seed noise on the machine it ran on, not against that.  A call close to the threshold can change with
the processor or the seeds: with seeds 0–9, on an Intel Xeon and on an AMD EPYC both CTPO and GSPO ended above
GRPO, but on each a different one of the two cleared the Holm correction, and on the EPYC seeds 10–19 put CTPO
below GRPO.  Hence 20 seeds by default; yet with 20 seeds an AMD EPYC whose kernels run AVX2 separated GSPO and
not CTPO from GRPO, and one running AVX-512 CTPO and not GSPO (40 seeds there separated both), while an Intel
Xeon running AVX-512 separated both at 20 seeds (the README gives the tables).  The warm start is fixed as
well (seed 0, 1,000 supervised steps): over three 2,000-step warm starts on the AVX-512 EPYC
(``scripts/main_job_warm_starts.py``) nothing separated on final accuracy, while CTPO's faster learning (the
secondary comparison) held.  ``verdict.md`` / ``verdict.json`` name the processor
and torch's CPU kernel set, and a claim meant to carry over needs a margin far from the threshold, or more seeds
(``--seeds``; the sign-flip test is exact up to 40).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctpo_lab import compare, stats
from ctpo_lab.cli import ArgumentParser, consecutive_seeds, folder_path, int_at_least
from ctpo_lab.machine import describe_machine, machine_record
from ctpo_lab.runsafety import atomic_write_text

__all__ = ["MainJob", "MAIN_JOB", "main_job_spec", "verdict", "grid_verdict", "format_verdict", "auc_frame",
           "subset_markdown", "run_main_job", "main"]

COMMAND = "python -m ctpo_lab.train main"
ALPHA = 0.05


@dataclass(frozen=True)
class MainJob:
    """The main job's settings: a cell of a regime study preset, the losses (the first is the reference), the
    number of paired seeds, the default output folder and overrides added to the cell's."""

    study: str = "cpu"
    cell: str = "short-u16-k0-same"
    losses: tuple[str, ...] = ("grpo", "gspo", "ctpo", "ctpo_fixed")
    seeds: int = 20
    out: str = "runs/main"
    #: appended to the cell's overrides: the ratio dumps of the gallery's trainer Figure 1 (every 4th step; the
    #: dumps read tensors only, so the runs' numbers are those of the study's runs)
    extra_overrides: tuple[str, ...] = ("dump_every=4",)


#: The built-in defaults of ``python -m ctpo_lab.train``.
MAIN_JOB = MainJob()


def main_job_spec(job: MainJob = MAIN_JOB, *, first_seed: int = 0, seeds: int | None = None,
                  cell: str | None = None) -> compare.GridSpec:
    """The :class:`ctpo_lab.compare.GridSpec` of the main job: the study cell's overrides and steps, seeds
    ``first_seed … first_seed + seeds − 1``.  Unknown cell or study: ``ValueError`` naming the argument."""
    from ctpo_lab.train import regime

    if job.study not in regime.STUDY_PRESETS:
        raise ValueError(f"study: unknown study preset {job.study!r}; expected one of {sorted(regime.STUDY_PRESETS)}")
    study = regime.STUDY_PRESETS[job.study]
    # None is the job's cell; any other value, '' included, must name a cell of the study
    c = study.cell(job.cell if cell is None else cell)
    n = job.seeds if seeds is None else seeds
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"seeds: a paired test needs at least 2 seeds, got {n!r}")
    if n > compare.MAX_GRID_SEEDS:
        raise ValueError(f"seeds: expected at most {compare.MAX_GRID_SEEDS} seeds, got {n}")
    if isinstance(first_seed, bool) or not isinstance(first_seed, int) or first_seed < 0:
        raise ValueError(f"seed: expected an int ≥ 0, got {first_seed!r}")
    return compare.GridSpec(study.train_preset, tuple(job.losses), tuple(consecutive_seeds(first_seed, n)),
                            (*c.overrides(study), *job.extra_overrides), study.steps)


def _classify(p: float, p_holm: float, low: float, high: float, alpha: float) -> str:
    if not math.isfinite(p):
        return "not tested"
    excludes_zero = low > 0 or high < 0
    if p_holm < alpha and excludes_zero:
        return "separated"
    if p < alpha:
        return "borderline"
    return "not separated"


def verdict(paired: pd.DataFrame, *, alpha: float = ALPHA) -> pd.DataFrame:
    """Classify each paired comparison (rows of :func:`ctpo_lab.compare.paired_comparison`: ``loss``,
    ``reference``, ``paired seeds``, ``mean difference``, ``CI low``, ``CI high``, ``sign-flip p``).

    Adds ``holm p`` (Holm's step-down adjustment over the rows, :func:`ctpo_lab.stats.holm_adjust`) and
    ``verdict``: ``separated`` (Holm p < alpha and the CI excludes 0), ``borderline`` (only the raw p < alpha)
    or ``not separated``.  ``alpha`` must lie in (0, 1).
    """
    if not (isinstance(alpha, float) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha: expected a float in (0, 1), got {alpha!r}")
    missing = {"loss", "reference", "mean difference", "CI low", "CI high", "sign-flip p"} - set(paired.columns)
    if missing:
        raise ValueError(f"paired: missing columns {sorted(missing)}")
    out = paired.copy().reset_index(drop=True)
    out["holm p"] = stats.holm_adjust(out["sign-flip p"].to_numpy(dtype=np.float64))
    out["verdict"] = [_classify(float(r["sign-flip p"]), float(r["holm p"]), float(r["CI low"]), float(r["CI high"]),
                                alpha) for _, r in out.iterrows()]
    return out


def grid_verdict(df: pd.DataFrame, reference: str, *, alpha: float = ALPHA,
                 metric: str = "eval_accuracy") -> pd.DataFrame:
    """:func:`verdict` of a loaded grid (:func:`ctpo_lab.compare.load_grid`): every other loss against
    ``reference`` and, when both are present, CTPO against CTPO-fixed (empty when nothing can be compared), on
    the last value of ``metric`` per run."""
    family = [compare.paired_comparison(df, reference, metric=metric)]
    if {"ctpo", "ctpo_fixed"} <= set(df["loss"]):
        family.append(compare.paired_comparison(df, "ctpo_fixed", ["ctpo"], metric=metric))
    family = [f for f in family if not f.empty]
    return verdict(pd.concat(family, ignore_index=True), alpha=alpha) if family else pd.DataFrame()


def auc_frame(out: str | Path, spec: compare.GridSpec) -> pd.DataFrame:
    """One row per finished run of the grid in ``out``: ``loss``, ``seed``, ``step`` (0) and ``auc_accuracy``
    (:func:`ctpo_lab.train.regime.run_outcomes`: the trapezoidal area under held-out accuracy vs step over the
    step range, i.e. the mean accuracy over training), in the long layout :func:`grid_verdict` reads."""
    from ctpo_lab.train import regime

    rows = []
    for loss in spec.losses:
        for seed in spec.seeds:
            outcome = regime.run_outcomes(compare.run_dir(Path(out), loss, seed))
            if outcome is not None and math.isfinite(outcome["auc_accuracy"]):
                rows.append({"loss": loss, "seed": seed, "step": 0, "auc_accuracy": outcome["auc_accuracy"]})
    return pd.DataFrame(rows, columns=["loss", "seed", "step", "auc_accuracy"])


def _comparison_rows(table: pd.DataFrame) -> list[str]:
    return [f"| {r['loss']} − {r['reference']} | {r['mean difference']:+.3f} [{r['CI low']:+.3f}, "
            f"{r['CI high']:+.3f}] | {r['sign-flip p']:.2g} | {r['holm p']:.2g} | {r['verdict']} |"
            for _, r in table.iterrows()]


def subset_markdown(df: pd.DataFrame, auc: pd.DataFrame, reference: str, heading: str) -> list[str]:
    """Markdown lines of the main job's tables and verdicts on the runs of ``df`` (a loaded grid, or part or a
    concatenation of grids with one ``seed`` per pair of runs) and ``auc`` (:func:`auc_frame` of the same runs).

    A table of each loss's initial and final held-out accuracy, its accuracy averaged over training (mean [95%
    bootstrap CI] over seeds) and how many seeds it ends above ``reference``; then :func:`grid_verdict` on final
    accuracy and on the average over training (Holm over this subset's own comparisons)."""
    n = df["seed"].nunique()
    table = compare.final_table(df)
    auc_ci = {loss: compare.final_table(  # the bootstrap CI of the per-run average, with final_table's CI
        pd.DataFrame({"loss": loss, "seed": g["seed"], "step": 0, "eval_accuracy": g["auc_accuracy"]})
    )["final accuracy"].iloc[0] for loss, g in auc.groupby("loss", sort=False)}
    last_acc = df.sort_values("step").groupby(["loss", "seed"])["eval_accuracy"].last().unstack(0)
    lines = [f"## {heading} ({n} paired seeds)", "",
             "| loss | initial accuracy | final accuracy | accuracy averaged over training | "
             f"ends above {reference} |", "|---|---|---|---|---|"]
    for _, r in table.iterrows():
        above = ("—" if r["loss"] == reference else
                 f"{int((last_acc[r['loss']] > last_acc[reference]).sum())} of {len(last_acc)}")
        lines.append(f"| {r['loss']} | {r['initial accuracy']} | {r['final accuracy']} | "
                     f"{auc_ci.get(r['loss'], 'n/a')} | {above} |")
    for what, result in (("final accuracy", grid_verdict(df, reference)),
                         ("accuracy averaged over training", grid_verdict(auc, reference, metric="auc_accuracy"))):
        lines += ["", f"{what}: paired difference [95% CI], sign-flip p, Holm p over {len(result)}, verdict", "",
                  "| comparison | difference | p | Holm p | verdict |", "|---|---|---|---|---|",
                  *_comparison_rows(result)]
    lines.append("")
    return lines


def _format_p(p: float) -> str:
    """Four decimals, or two significant digits below 1e-4 (20 seeds reach 2/2^20 ≈ 1.9e-6, 40 seeds 1.8e-12)."""
    return f"{p:.4f}" if p >= 1e-4 or p == 0 else f"{p:.1e}"


def format_verdict(table: pd.DataFrame, *, alpha: float = ALPHA, what: str = "final accuracy") -> list[str]:
    """One sentence per comparison of :func:`verdict`'s table (``what`` names the compared quantity)."""
    lines = []
    for _, r in table.iterrows():
        d, lo, hi = float(r["mean difference"]), float(r["CI low"]), float(r["CI high"])
        n = int(r.get("paired seeds", 0))
        diff = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        p = f"p = {_format_p(float(r['sign-flip p']))}, Holm p = {_format_p(float(r['holm p']))}"
        if r["verdict"] == "separated":
            word = "above" if d > 0 else "below"
            lines.append(f"{r['loss']} is {word} {r['reference']}: {what} difference {diff} over {n} paired "
                         f"seeds ({p}).")
        elif r["verdict"] == "borderline":
            lines.append(f"{r['loss']} vs {r['reference']}: borderline, {diff} ({p}): significant only before the "
                         f"correction for {len(table)} comparisons; not a claim (it can flip on another machine).")
        else:
            lines.append(f"{r['loss']} vs {r['reference']}: not separated at {n} paired seeds, difference {diff} "
                         f"({p}).")
    return lines


def run_main_job(out: str | Path | None = None, *, job: MainJob = MAIN_JOB, first_seed: int = 0,
                 seeds: int | None = None, cell: str | None = None, jobs: int | None = None,
                 overwrite: bool = False, alpha: float = ALPHA, progress: bool = True) -> dict[str, Any]:
    """Run (or reuse) the main job's grid in ``out`` (default ``job.out``), summarize it and write
    ``verdict.md`` / ``verdict.json``; returns the grid's tables plus ``verdict`` (the table), ``lines``,
    ``auc_verdict`` / ``auc_lines`` (the secondary comparison of accuracy averaged over training), ``out`` and
    ``seconds``.  Bad input raises ``ValueError`` naming the argument before any work."""
    spec = main_job_spec(job, first_seed=first_seed, seeds=seeds, cell=cell)
    if not (isinstance(alpha, float) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha: expected a float in (0, 1), got {alpha!r}")
    reference = spec.losses[0]
    out = Path(out if out is not None else job.out)
    start = time.time()
    result = compare.run_comparison(spec, out, jobs=jobs, overwrite=overwrite, reference=reference,
                                    progress=progress)
    table = grid_verdict(compare.load_grid(out), reference, alpha=alpha)
    lines = format_verdict(table, alpha=alpha) if not table.empty else []
    cell_name = job.cell if cell is None else cell
    machine = machine_record()
    test_kind = "exact" if stats.sign_flip_is_exact(len(spec.seeds)) else "Monte Carlo (200 000 sign patterns)"
    header = (f"Main job: {', '.join(spec.losses)} × {len(spec.seeds)} paired seeds (seeds {spec.seeds[0]}–"
              f"{spec.seeds[-1]}) on the regime cell {cell_name} ({job.study} study: {spec.steps} rollout steps, "
              f"overrides {' '.join(spec.overrides)}). Verdict rule: separated = {test_kind} paired sign-flip p, "
              f"Holm-adjusted over {len(table)} comparisons, < {alpha} and the 95% bootstrap CI of the mean "
              "paired difference excludes 0. Every number below is machine-dependent (CPU float results differ "
              "between processors, from the warm start on): the rule guards against seed noise on this machine, "
              "and a call near the threshold can differ on a processor with other float kernels. "
              f"Machine: {describe_machine(machine)}.")
    body = "\n".join(f"- {x}" for x in lines) or "- no comparison (a single loss)"
    auc = auc_frame(out, spec)
    auc_table = grid_verdict(auc, reference, alpha=alpha, metric="auc_accuracy") if not auc.empty else pd.DataFrame()
    auc_lines = format_verdict(auc_table, alpha=alpha, what="mean accuracy over training") \
        if not auc_table.empty else []
    secondary = ("## Secondary: accuracy averaged over training (AUC)\n\nThe same rule on each run's held-out "
                 "accuracy averaged over its evaluations (trapezoidal area under accuracy vs step over the step "
                 "range), Holm-adjusted over its own comparisons. It measures how fast a loss learns, not where it "
                 "ends; the verdict above is on final accuracy.\n\n"
                 + ("\n".join(f"- {x}" for x in auc_lines) or "- no comparison"))
    atomic_write_text(out / "verdict.md", f"# Verdict\n\n{header}\n\n{body}\n\n{secondary}\n")
    atomic_write_text(out / "verdict.json", json.dumps(
        {"cell": cell_name, "study": job.study, "losses": list(spec.losses), "seeds": list(spec.seeds),
         "alpha": alpha, "machine": machine,
         "comparisons": json.loads(table.to_json(orient="records")) if not table.empty else [],
         "secondary_auc_comparisons": json.loads(auc_table.to_json(orient="records")) if not auc_table.empty
         else []},
        indent=1))
    return {**result, "verdict": table, "lines": lines, "auc_verdict": auc_table, "auc_lines": auc_lines,
            "header": header, "out": out, "seconds": time.time() - start}


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--seed", type=int_at_least(0), default=0, help="first seed (seeds S..S+N-1; default 0)")
    ap.add_argument("--seeds", type=int_at_least(2, compare.MAX_GRID_SEEDS), default=MAIN_JOB.seeds,
                    help=f"number of paired seeds (default {MAIN_JOB.seeds})")
    ap.add_argument("--cell", default=MAIN_JOB.cell,
                    help=f"a cell of the {MAIN_JOB.study} regime study (default {MAIN_JOB.cell}; "
                    "`python -m ctpo_lab.train regime --list` shows them)")
    ap.add_argument("--out", type=folder_path, default=MAIN_JOB.out, help=f"grid folder (default {MAIN_JOB.out})")
    ap.add_argument("--jobs", type=int_at_least(1), default=None, help="parallel runs (default: CPU cores)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing, different grid folder (not needed to add seeds or losses: "
                    "a grid this one extends keeps its finished runs)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 1 a run failed (its log named), 2 bad input (one line
    ``error: <argument>: <expected>``), 130 interrupted."""
    from ctpo_lab import cli

    flags = {n: f"--{n}" for n in ("seed", "seeds", "cell", "out", "jobs", "overwrite")}
    return cli.run(lambda: _main(argv), flags={**flags, "cells": "--cell"}, prog=COMMAND)


def _main(argv: Sequence[str] | None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        result = run_main_job(args.out, first_seed=args.seed, seeds=args.seeds, cell=args.cell, jobs=args.jobs,
                              overwrite=args.overwrite)
    except RuntimeError as e:  # a run failed: its log says why
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    shown = ["loss", "seeds", "initial accuracy", "final accuracy", "accuracy gain", "clip fraction",
             "KL after last update"]
    print(result["table2"][shown].to_markdown(index=False))
    print("\n" + result["header"] + "\n")
    for line in result["lines"]:
        print(f"- {line}")
    if result["auc_lines"]:
        print("\nSecondary, accuracy averaged over training (how fast a loss learns; Holm over its own comparisons):")
        for line in result["auc_lines"]:
            print(f"- {line}")
    print(f"\n[main] wrote {result['out']}/verdict.md, table2.md, paired.md, fig2.png in {result['seconds']:.0f} s")
    return 0
