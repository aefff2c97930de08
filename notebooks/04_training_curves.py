# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Training curves and the estimator comparison
#
# `ctpo_lab.train` is a compact GRPO-family trainer: a small Llama (warm-started on noisy demonstrations so that
# RL has room to improve it) learns a synthetic task with an exact answer checker. Each step
#
# 1. samples B prompts × G responses from the current policy μ, recording log μ per token;
# 2. scores them and computes GRPO advantages (R − mean_group)/(std_group + 10⁻⁶);
# 3. splits the rollout batch into mini-batches of whole groups and takes one optimizer step per mini-batch:
#    update 1 is on-policy, update j sees a policy j − 1 updates away from μ — the off-policyness that the
#    importance ratios (token, GSPO, cumulative) correct;
# 4. measures, after the last update, how far the policy has moved from μ on the whole batch.
#
# `ctpo_lab.compare` runs a grid of loss presets × seeds (each cell an ordinary run folder, reused when finished,
# resumed when interrupted) and aggregates it: curves with bootstrap bands over seeds, a Table-2-style summary,
# paired-seed comparisons with an exact permutation test.
#
# Under `SMALL` this notebook runs a tiny grid (trainer preset `cpu-tiny`: a 1-layer model, 2 steps, 2 losses ×
# 2 seeds) — enough to show the workflow, far too small to compare anything. Set `CTPO_LAB_GRID` to the folder of
# an existing grid (e.g. the output of `python -m ctpo_lab.train`) to analyse that instead.

# %%
import io
import itertools
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml
from IPython.display import Image

import ctpo_lab
from ctpo_lab import compare, dumps, stats

SMALL = os.environ.get("CI") == "true" or os.environ.get("CTPO_LAB_SMALL") == "1"
pd.set_option("display.precision", 4)
pd.set_option("display.max_columns", 20)
pd.set_option("display.width", 160)
START = time.time()

repo = Path(ctpo_lab.__file__).resolve().parents[1]
default_grid = repo / "runs" / "main"  # what `python -m ctpo_lab.train` (the main job) writes
if os.environ.get("CTPO_LAB_GRID"):
    grid_dir = Path(os.environ["CTPO_LAB_GRID"]).expanduser()
    print(f"analysing the existing grid {grid_dir} (CTPO_LAB_GRID)")
elif not SMALL and (default_grid / "grid.json").is_file():
    grid_dir = default_grid
    print(f"analysing the existing grid {grid_dir}")
else:
    scratch = Path(os.environ.get("CTPO_LAB_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="ctpo_lab_nb04_"))
    grid_dir = scratch / "grid"
    spec = (compare.GridSpec("cpu-tiny", losses=("grpo", "ctpo"), seeds=(0, 1)) if SMALL
            else compare.GridSpec("cpu-smoke", losses=("grpo", "gspo", "ctpo"), seeds=(0, 1, 2)))
    print(f"running the grid {spec.to_dict()} into {grid_dir}")
    t0 = time.time()
    compare.run_grid(spec, grid_dir, jobs=2, progress=False)
    print(f"grid finished in {time.time() - t0:.0f} s")

# %% [markdown]
# ## 1 · One run folder
# Every cell of the grid is a run folder `runs/<loss>-seed<S>` with its resolved `config.yaml`, a
# `metrics.jsonl` (one record per step), checkpoints, and per-step dumps of the cumulative log-ratios
# (`ratios/step_XXXXXXX_rank_XXXX.npz`, the authors' dump format).

# %%
runs = sorted((grid_dir / "runs").iterdir())
first = runs[0]
cfg = yaml.safe_load((first / "config.yaml").read_text())
print(first.name, "→", sorted(p.name for p in first.iterdir()))
n_mb = cfg["batch_prompts"] // cfg["mini_batch_prompts"]
print(f"task {cfg['task']!r}, {cfg['steps']} steps; each step: {cfg['batch_prompts']} prompts × G={cfg['group_size']}, "
      f"{n_mb} mini-batches × {cfg['ppo_epochs']} epoch(s) = {n_mb * cfg['ppo_epochs']} updates per rollout batch")

# %% [markdown]
# ## 2 · The measured off-policyness
# `compare.load_grid` stacks every run's `metrics.jsonl` into one long table (columns `loss`, `seed`, `step`,
# then the metrics). The ones that measure off-policyness:
#
# * `offpolicy/kl`: after the last update, on the whole rollout batch, the mean over tokens of log μ − log π
#   (the k1 estimator of KL(μ‖π): unbiased but noisy, it **can be negative** on a small batch);
# * `offpolicy/kl_k3`: the same with k3 = e^ℓ − 1 − ℓ ≥ 0 per token (never negative, slightly biased);
# * `offpolicy/max_abs_log_ratio`: the largest |ℓ_t| in the batch;
# * `actor/ppo_kl`: the loss's own mean(log μ − log π) on the mini-batch it trains on, averaged over the updates
#   of the step (it is 0 at update 1); `offpolicy/last_mb/ppo_kl` and `offpolicy/last_mb/clip/total/rate`: the
#   same on the last, most stale mini-batch;
# * `pg_update/clip/total/rate`: the advantage-aware clip fraction — tokens with A > 0 above the upper bound,
#   A < 0 below the lower bound, or caught by the dual clip (`…/high`, `…/low`, `…/dual` split it);
# * `pg_update/ess/token`, `pg_update/ess/sequence`: normalised effective sample size of the weights.

# %%
df = compare.load_grid(grid_dir)
offp = ["offpolicy/kl", "offpolicy/kl_k3", "actor/ppo_kl", "offpolicy/last_mb/ppo_kl",
        "pg_update/clip/total/rate", "pg_update/clip/high/rate", "pg_update/clip/low/rate",
        "pg_update/clip/dual/rate", "pg_update/ess/token"]
shown = [c for c in ["loss", "seed", "step", "reward_mean", "eval_accuracy", *offp] if c in df]
print(f"{df['loss'].nunique()} losses × {df['seed'].nunique()} seeds, {len(df)} records, {df.shape[1]} columns")
display(df[shown].dropna(subset=["reward_mean"]).groupby(["loss", "step"]).mean(numeric_only=True)  # noqa: F821
        .drop(columns="seed"))

# %% [markdown]
# ## 3 · The comparison tables
# `compare.final_table` (the Table 2 analogue): per loss, the mean over seeds with a 95% percentile-bootstrap CI
# of the first and last held-out accuracy, their difference, and the per-run means over steps of the clip
# fraction, of the response length and of `offpolicy/kl_k3` (the column `KL after last update`: the KL on the
# whole rollout batch once the last mini-batch update is done, k3 estimate, never negative).

# %%
table = compare.final_table(df)
display(table[["loss", "seeds", "initial accuracy", "final accuracy", "accuracy gain", "clip fraction",  # noqa: F821
               "KL after last update", "response length"]])

# %% [markdown]
# `compare.paired_comparison` pairs the runs by seed (same seed → same prompts and the same warm start), takes
# the difference of final accuracies d_s = final(loss, s) − final(reference, s), and reports the mean difference
# with a bootstrap CI and the exact two-sided sign-flip permutation p-value.

# %%
reference = "grpo" if "grpo" in set(df["loss"]) else df["loss"].iloc[0]
paired = compare.paired_comparison(df, reference)
display(paired[["loss", "reference", "paired seeds", "mean difference", "CI low", "CI high",  # noqa: F821
                "sign-flip p"]])

# %% [markdown]
# ## 4 · Reading CIs with few seeds
# Two facts bound what a handful of seeds can say, whatever the data:
#
# * a percentile-bootstrap CI of a mean over n seeds lies inside [min, max] of the n values: with 2–3 seeds it
#   is the spread of the seeds, not a statement about the population, and it is too narrow;
# * the exact sign-flip test enumerates the 2ⁿ sign patterns of the paired differences, so even when every
#   difference has the same sign its p-value cannot go below 2/2ⁿ.
#
# The smallest attainable p-value by number of paired seeds (computed by enumerating the patterns):

# %%


def smallest_sign_flip_p(n: int) -> float:
    d = np.ones(n)  # every seed favours the same loss by the same amount: the most extreme data possible
    null = np.abs(np.array(list(itertools.product([-1.0, 1.0], repeat=n))) @ d / n)
    return float((null >= abs(d.mean()) - 1e-12).mean())


pd.DataFrame({"paired seeds": range(2, 9), "smallest possible p": [smallest_sign_flip_p(n) for n in range(2, 9)]}
             ).set_index("paired seeds").transpose()

# %% [markdown]
# So a claim at the 5% level needs at least 6 paired seeds with consistent signs, and a paper reporting one run
# per method (as Table 2 does) cannot separate the methods from seed noise. Point estimates of a few seeds are
# still useful to see *whether* a loss trains; the bands below show how much seeds disagree.
#
# ## 5 · Curves (the Figure 2 analogue)
# `compare.plot_curves` draws the mean over seeds with a 95% bootstrap band per loss, for held-out accuracy,
# clip fraction, response length and `offpolicy/kl_k3`.

# %%
fig = compare.plot_curves(df, title=f"{grid_dir.name}: mean over seeds, 95% bootstrap band")
# plot_curves switches matplotlib to the non-interactive Agg backend, so show the figure as a PNG explicitly
buf = io.BytesIO()
fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
plt.close(fig)
display(Image(buf.getvalue()))  # noqa: F821

# %% [markdown]
# ## 6 · The per-step ratio dumps
# With `dump_every > 0` the trainer writes the cumulative log-ratios of the last mini-batch of a step (the most
# stale one) in the authors' format; `ctpo_lab.dumps.read_step` loads them, and the statistics of notebooks 02–03
# apply. The `cpu-tiny` task has answers of a few tokens, so only the shape of the data is shown here; on the
# longer `chain` task of the `cpu` preset the √t fit and the clip-rate profiles are meaningful.

# %%
rows = []
for run in runs:
    steps = dumps.list_steps(run / "ratios") if (run / "ratios").is_dir() else []
    if not steps:
        continue
    d = dumps.read_step(run / "ratios", steps[-1])
    lengths = d.mask.sum(1)
    row = {"run": run.name, "step": steps[-1], "sequences": d.mask.shape[0], "mean length": lengths.mean(),
           "max |L_t|": float(np.abs(d.cum_log_ratio[d.mask]).max()) if d.mask.any() else np.nan}
    if lengths.max() < 30:
        row["√t fit"] = "responses too short"
        rows.append(row)
        continue
    try:
        fit = stats.sqrt_t_fit(d.cum_log_ratio, d.mask, d.group_ids, cluster="sequence", bin_width=10, min_count=10,
                               max_position=None, n_boot=200)
        row.update({"σ̂": fit.sigma_hat, "exponent": fit.exponent, "exponent CI": fit.exponent_ci})
    except ValueError as e:
        row["√t fit"] = f"not possible: {str(e)[:60]}…"
    rows.append(row)
pd.DataFrame(rows)

# %%
print(f"notebook ran in {time.time() - START:.1f} s (SMALL={SMALL}, grid={grid_dir})")
