"""Training families: ``fig2_*`` (curves with CI bands), ``table2_*``, ``table3_*`` and ``fig1_trainer_*``
(Figure-1 statistics of the trainer's own ratio dumps), all from one grid of runs (:mod:`ctpo_lab.compare`).

The full run uses the grid of the README's main job (``runs/main``, :mod:`ctpo_lab.train.main_job`: GRPO, GSPO,
CTPO and CTPO-fixed × 20 paired seeds on a cell of the ``cpu`` regime study) and reuses its finished runs;
``--quick`` runs a CI-sized grid.  Paired comparisons are against the grid's first loss (GRPO).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctpo_lab import compare
from ctpo_lab.figures.common import cached, save_figure, save_table
from ctpo_lab.stats import format_ci

FAMILY = "training"
LOSSES = ("grpo", "gspo", "ctpo", "ctpo_fixed")


def grid_spec(quick: bool, seed: int) -> compare.GridSpec:
    if quick:
        return compare.GridSpec("cpu-tiny", LOSSES, (seed, seed + 1),
                                ("eval_every=2", "dump_every=2", "ckpt_every=3"), steps=6)
    from ctpo_lab.train.main_job import main_job_spec

    return main_job_spec(first_seed=seed)


def _dump_matrices(run_dirs: list[Path]) -> dict[str, np.ndarray] | None:
    """Pool the ratio dumps of the second half of training of several runs: ℓ, mask, advantages, groups."""
    from ctpo_lab import dumps

    blocks = []
    for k, run in enumerate(run_dirs):
        directory = run / "ratios"
        steps = dumps.list_steps(directory) if directory.is_dir() else []
        for step in steps[len(steps) // 2:]:
            d = dumps.read_step(directory, step)
            groups = d.group_ids if d.group_ids is not None else np.arange(d.mask.shape[0])
            blocks.append((d.cum_log_ratio, d.mask, d.advantages, groups + 1_000_000 * (k * 10_000 + step)))
    if not blocks:
        return None
    width = max(b[0].shape[1] for b in blocks)

    def pad(x: np.ndarray, fill) -> np.ndarray:
        return np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=fill)

    cum = np.concatenate([pad(b[0], 0.0) for b in blocks])
    mask = np.concatenate([pad(b[1], False) for b in blocks])
    # L is constant across masked-out tokens, so its first difference is ℓ on valid tokens
    ell = np.where(mask, np.diff(cum, axis=1, prepend=0.0), 0.0)
    adv = None
    if all(b[2] is not None for b in blocks):
        adv = np.concatenate([pad(b[2], 0.0) for b in blocks])
    return {"log_ratio": ell, "mask": mask, "advantages": adv, "groups": np.concatenate([b[3] for b in blocks])}


def make(out: Path, *, quick: bool, seed: int, cache: Path, command: str, grid_dir: Path | None = None
         ) -> list[Path]:
    """Run or reuse the grid, summarize it, and write the fig2/table2/table3/fig1_trainer files."""
    from ctpo_lab.analysis import trajectory_statistics
    from ctpo_lab.figures.position import figure1

    if grid_dir is not None:  # a given grid is aggregated as it is: nothing is trained because of a path
        from ctpo_lab.runsafety import prepare_output

        grid = Path(grid_dir)
        spec = compare.read_grid_spec(grid, name="grid")
        df = compare.load_grid(grid, name="grid", warn=False)  # (the command line's checks named unfinished runs)
        prepare_output(grid, command="python -m ctpo_lab.figures", resume=True, name="grid",  # aggregate writes
                       owners=("python -m ctpo_lab.train compare",))
    else:
        spec = grid_spec(quick, seed)
        from ctpo_lab.train.main_job import MAIN_JOB

        grid = cache / "grid-quick" if quick else Path(MAIN_JOB.out)
        compare.run_grid(spec, grid)
        df = compare.load_grid(grid)
    reference = spec.losses[0]
    result = compare.summarize_grid(grid, reference=reference, warn=False)
    seeds = list(spec.seeds)
    common = {"command": command, "seeds": seeds, "extra": {"grid": f"{grid} (preset {spec.train_preset})"}}
    files: list[Path] = []
    table2 = result["table2"]
    shown = ["loss", "seeds", "initial accuracy", "final accuracy", "accuracy gain", "clip fraction",
             "KL after last update", "response length"]
    ranked = table2.sort_values("final accuracy mean", ascending=False)
    means = ranked["final accuracy mean"].to_numpy(dtype=float)
    if np.nanmax(means) - np.nanmin(means) < 1e-12:
        ordering = "all losses end at the same mean accuracy"
    else:
        ordering = "ordering of the final-accuracy means: " + " > ".join(
            f"{loss} ({m:.3f})" for loss, m in zip(ranked["loss"], means))
    note = (" This is the CI-sized structural run (a tiny untrained model, a few steps): its numbers say nothing "
            "about the estimators." if quick else "")
    files += save_table(table2[shown], out, "table2_estimators",
                        finding="Table 2 analogue: held-out accuracy per loss, mean [95% bootstrap CI] over seeds; "
                        f"{ordering} (table2_paired says whether the differences exceed seed noise).{note}", **common)
    if "paired" in result:
        files += save_table(result["paired"], out, "table2_paired",
                            finding=f"Final held-out accuracy of each loss minus {reference}'s, paired by seed, with a "
                            "bootstrap CI and the exact sign-flip permutation p-value.", **common)
    if "paired" in result and not quick:
        from ctpo_lab.train.main_job import format_verdict, grid_verdict

        table = grid_verdict(df, reference)
        files += save_table(table, out, "table2_verdict",
                            finding="The main job's verdict (ctpo_lab.train.main_job.verdict): separated = exact "
                            "paired sign-flip p, Holm-adjusted over the comparisons, < 0.05 and the 95% bootstrap "
                            "CI of the mean paired difference excludes 0. " + " ".join(format_verdict(table)),
                            **common)
    if "table3" in result:
        files += save_table(result["table3"], out, "table3_adaptive_vs_fixed",
                            finding="Table 3 analogue: CTPO with the √t window vs a fixed log window, paired by seed.",
                            **common)
    fig = compare.plot_curves(df, title="Training dynamics (mean over seeds, 95% bootstrap band)")
    files += save_figure(fig, out, "fig2_training_curves",
                         finding="Figure 2 analogue: held-out accuracy, advantage-aware clip fraction, response "
                         "length and the KL between the behaviour policy and the policy after the last mini-batch, "
                         "per loss, mean over seeds with 95% bootstrap bands.", **common)

    def dump_stats() -> dict:
        res = {}
        for loss in ("ctpo", "grpo"):
            runs = [compare.run_dir(grid, loss, s) for s in seeds]
            m = _dump_matrices(runs)
            if m is None:
                continue
            try:
                res[loss] = trajectory_statistics(m["log_ratio"], m["mask"], m["advantages"], m["groups"],
                                                  bin_width=10 if quick else 25, min_count=5 if quick else 20,
                                                  min_sequences=3 if quick else 10, n_boot=300, seed=seed)
            except ValueError as e:
                res[loss] = {"error": str(e)}
        return res

    stats_by_loss = cached(cache, "trainer_dump_stats", {"grid": str(grid.resolve()), "spec": spec.to_dict(),
                                                         "runs_mtime": _mtime(grid)}, dump_stats)
    ok = {k: v for k, v in stats_by_loss.items() if "error" not in v}
    if ok:
        fig = figure1(ok, bin_width=10 if quick else 25,
                      title="Trainer ratio dumps (last mini-batch, second half of training)")
        desc = "; ".join(f"{k}: σ̂ = {v['sigma_hat']:.4f}, free exponent "
                         + format_ci(v["exponent"], *v["exponent_ci"], 2, style="f") for k, v in ok.items())
        files += save_figure(fig, out, "fig1_trainer",
                             finding="Figure 1 analogue from the trainer's own ratio dumps (the most off-policy "
                             f"mini-batch of each step): {desc}.", **common)
    return files


def _mtime(grid: Path) -> float:
    paths = list(grid.glob(f"runs/*/{compare.FINISHED_FILE}"))
    return max((p.stat().st_mtime for p in paths), default=0.0)
