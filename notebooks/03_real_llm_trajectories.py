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
# # 03 · Real-LLM trajectories
#
# Notebooks 01–02 used synthetic chains whose mismatch we set by hand. Here the log-ratios come from a real
# causal language model, with the off-policyness produced the way the paper's training loop produces it:
#
# 1. a behaviour model μ samples G responses per prompt, recording log μ(y_t|s_t) for every response token;
# 2. the responses are rewarded and given GRPO advantages (R − mean_group)/(std_group + 10⁻⁶);
# 3. k optimizer steps of a GRPO-style update (AdamW on a loss preset of `ctpo_lab.losses`, one minibatch per step)
#    turn μ into π_k: exactly what happens between update 1 and update k of a PPO epoch, where the k-th minibatch
#    is k updates stale;
# 4. π_k scores **held-out** responses of μ (prompts no update has seen), giving ℓ_t = log π_k − log μ, and,
#    from μ's cached final hidden states, the exact per-token KL(μ‖π_k)(s_t);
# 5. `ctpo_lab.stats` measures the √t law (σ̂ and the free exponent), the drift and the clip rates by position.
#
# Under `SMALL` (CI) the model is `tiny-random`, a 2-layer random Llama over characters: its numbers say nothing
# about LLMs, it only exercises the pipeline. Otherwise the notebook loads SmolLM2-135M-Instruct (`smollm2`,
# fetched once into `$CTPO_LAB_CACHE`, see DEVELOPERS.md), falling back to `tiny-random` with a message when the
# weights cannot be obtained. The command-line version of this notebook is `python -m ctpo_lab.llm`.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ctpo_lab import ratios, stats
from ctpo_lab.advantages import grpo_advantages
from ctpo_lab.llm import offpolicy
from ctpo_lab.llm.models import load_model
from ctpo_lab.llm.prompts import arithmetic_prompts, render_prompts, reward
from ctpo_lab.llm.rollout import reference_cache, sample
from ctpo_lab.style import estimator_color, estimator_label

SMALL = os.environ.get("CI") == "true" or os.environ.get("CTPO_LAB_SMALL") == "1"
torch.set_num_threads(1 if SMALL else 2)
torch.manual_seed(0)
pd.set_option("display.precision", 4)
START = time.time()

if SMALL:
    cfg = dict(model="tiny-random", train_prompts=8, eval_prompts=24, group_size=4, max_new_tokens=128,
               ks=(1, 4, 8), minibatches=8, lr=1e-3, bin_width=16, min_count=10, n_boot=300)
else:
    cfg = dict(model="smollm2", train_prompts=8, eval_prompts=24, group_size=4, max_new_tokens=256,
               ks=(1, 4, 8), minibatches=8, lr=1e-5, bin_width=32, min_count=20, n_boot=1000)

try:
    lm = load_model(cfg["model"], seed=0)
except (FileNotFoundError, ImportError, ValueError, OSError) as e:
    print(f"could not obtain {cfg['model']!r} ({type(e).__name__}: {e}); using 'tiny-random' instead")
    cfg.update(model="tiny-random", lr=1e-3)
    lm = load_model("tiny-random", seed=0)
tok = lm.tokenizer
n_params = sum(p.numel() for p in lm.model.parameters())
print(f"model {cfg['model']}: {n_params / 1e6:.2f}M parameters, vocabulary {len(tok)}")

# %% [markdown]
# ## 1 · Sampling from μ
# Built-in arithmetic word problems with integer answers (`arithmetic_prompts`), rendered with the model's chat
# template. `sample` decodes with a KV cache and records log μ of every sampled token (the EOS token included, as
# verl does); `keep_hidden=True` also keeps μ's final hidden states, from which the exact KL(μ‖π) is computed
# later without a second forward pass. The reward is `lenient` (1 for a correct boxed answer, 0.5 for the right
# number unboxed, +0.1 for ending with EOS) so that groups of a small model are not all-zero.

# %%
n_prompts = cfg["train_prompts"] + cfg["eval_prompts"]
prompts = arithmetic_prompts(n_prompts, seed=0)
print("example prompt:", prompts[0].text, "| answer:", prompts[0].answer)
prompt_ids = render_prompts(tok, prompts, max_prompt_tokens=lm.context_length - cfg["max_new_tokens"])
eos = sorted({t for t in (tok.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None))
              if isinstance(t, int)})
t0 = time.time()
batch = sample(lm.model, prompt_ids, group_size=cfg["group_size"], max_new_tokens=cfg["max_new_tokens"],
               eos_token_id=eos, pad_token_id=tok.pad_token_id, temperature=1.0, prompts_per_chunk=8, seed=0,
               keep_hidden=True)
texts = [tok.decode(batch.tokens[i][batch.mask[i]], skip_special_tokens=True) for i in range(len(batch))]
rewards = np.array([reward(txt, prompts[int(i)].answer, "lenient", finished=bool(f))
                    for txt, i, f in zip(texts, batch.prompt_index, batch.finished)])
adv = grpo_advantages(rewards, batch.group_id.numpy())  # float64 [N], numpy in → numpy out
print(f"sampled {len(batch)} responses in {time.time() - t0:.1f} s: {int(batch.mask.sum())} tokens, mean length "
      f"{batch.lengths.float().mean():.0f}, {batch.finished.float().mean():.0%} ended with EOS, "
      f"mean reward {rewards.mean():.3f}")
print("first response:", repr(texts[0][:160]))

# %% [markdown]
# ## 2 · Off-policyness from k stale updates
# The first `train_prompts` prompts feed the update; the others are held out. `stale_updates` runs the
# optimizer steps (loss preset `ctpo`) and calls back after each one; at the chosen k we score the held-out
# responses with π_k, passing μ's `reference_cache` so that the scorer also returns KL(μ‖π_k) per token.

# %%
is_train = (batch.prompt_index < cfg["train_prompts"]).numpy()
train, held_out = batch.subset(np.nonzero(is_train)[0]), batch.subset(np.nonzero(~is_train)[0])
adv_train, adv_eval = adv[is_train], adv[~is_train]
ref = reference_cache(lm.model, held_out.hidden, temperature=1.0)

scored, update_log = {}, []


def on_update(k: int, model, record) -> None:
    update_log.append({"update": k, **{m: record.metrics[m] for m in ("actor/ppo_kl", "pg_update/clip/total/rate")
                                       if m in record.metrics}})
    if k in cfg["ks"]:
        scored[k] = offpolicy.score_target(model, held_out, temperature=1.0, reference=ref)


t0 = time.time()
offpolicy.stale_updates(lm.model, train, adv_train,
                        offpolicy.StaleConfig(preset="ctpo", lr=cfg["lr"], num_minibatches=cfg["minibatches"]),
                        num_updates=max(cfg["ks"]), seed=0, on_update=on_update)
print(f"{max(cfg['ks'])} updates in {time.time() - t0:.1f} s")
pd.DataFrame(update_log).set_index("update")

# %% [markdown]
# `actor/ppo_kl` is the loss's own estimate of the mismatch on the minibatch it trains on (0 at the first
# update, which is on-policy); the held-out measurement below uses the exact KL instead.
#
# ## 3 · The √t law, the drift and the clip rates on real log-ratios
# For each k: ℓ_t = clamp(log π_k − log μ, −20, 20) on valid tokens, L_t its prefix sum over valid tokens
# (`ratios.token_log_ratio`, `ratios.cumulative_log_ratio`). Then
#
# * `stats.sqrt_t_fit` pooled (bootstrap over sequences) and centred within prompt groups (bootstrap over groups);
# * `stats.drift_profile` with the exact per-token KL: E L_t should track −Σ KL;
# * `stats.clip_rate_profile` for the fixed window w ∈ [0.5, 5] and the √t window, with each response's advantage.

# %%
mask = held_out.mask
groups = held_out.group_id.numpy()
analysis, rows = {}, []
for k, res in scored.items():
    ell = ratios.token_log_ratio(res.logp.double(), held_out.logp.double(), mask)
    L = ratios.cumulative_log_ratio(ell, mask)
    fit_kw = dict(bin_width=cfg["bin_width"], min_count=cfg["min_count"], min_sequences=min(cfg["min_count"], 10),
                  n_boot=cfg["n_boot"], max_position=None, seed=0)
    try:
        fit = stats.sqrt_t_fit(L, mask, groups, cluster="sequence", **fit_kw)
        fit_c = stats.sqrt_t_fit(L, mask, groups, center=True, **fit_kw)
    except ValueError as e:  # too few long responses for the grid
        print(f"k={k}: no √t fit ({e})")
        continue
    drift = stats.drift_profile(L, mask, res.kl, bin_width=cfg["bin_width"], min_count=cfg["min_count"])
    clip = {w: stats.profile_table(stats.clip_rate_profile(ell, mask, adv_eval, window=w,
                                                           bin_width=cfg["bin_width"]), cfg["min_count"])
            for w in ("fixed_window", "sqrt_t_window")}
    overall = {w: float(np.nansum(c.clip_rate * c.count) / c.count[np.isfinite(c.clip_rate)].sum())
               for w, c in clip.items()}
    analysis[k] = dict(fit=fit, fit_c=fit_c, drift=drift, clip=clip)
    rows.append({"k": k, "KL(μ‖π) per token": drift.kl_per_token, "mean ℓ_t": drift.mean_log_ratio,
                 "drift per token": drift.drift_per_token, "σ̂": fit.sigma_hat,
                 "exponent": fit.exponent, "exp. CI low": fit.exponent_ci[0], "exp. CI high": fit.exponent_ci[1],
                 "centred exponent": fit_c.exponent, "c. CI low": fit_c.exponent_ci[0],
                 "c. CI high": fit_c.exponent_ci[1], "clip fixed [0.5,5]": overall["fixed_window"],
                 "clip √t": overall["sqrt_t_window"], "max |ℓ_t|": float(ell.abs().max())})
summary = pd.DataFrame(rows).set_index("k")
display(summary)  # noqa: F821

# %% [markdown]
# How to read the table: the per-token KL and σ̂ say how far π_k has moved from μ (they usually grow with k, but
# not necessarily monotonically: a later minibatch can partly undo an earlier step); the mean of ℓ_t estimates
# −KL, as it must under μ; the exponent CIs say whether sd(L_t) grows like √t on these responses (pooled) and
# within prompts (centred). With few, short responses the CIs are wide — a verdict needs the full-size run.
#
# ## 4 · Figure 1, on these trajectories

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
base = np.array(plt.matplotlib.colors.to_rgb(estimator_color("cumulative")))
shade = dict(zip(analysis, np.linspace(0.35, 1.0, len(analysis))))
for k, a in analysis.items():
    col = base * shade[k] + (1 - shade[k]) * 0.8
    f = a["fit"]
    ok = np.isfinite(f.bin_std)
    axes[0].plot(f.bin_center[ok], f.bin_std[ok], "o", ms=3, color=col, label=f"k={k}: sd(L_t)")
    tt = np.linspace(1, f.bin_center[ok].max(), 200)
    axes[0].plot(tt, f.fixed_curve(tt), "-", lw=1, color=col, label=f"k={k}: σ̂√t, σ̂={f.sigma_hat:.3f}")
    axes[0].plot(tt, f.free_curve(tt), ":", lw=1, color=col, label=f"k={k}: t^β, β={f.exponent:.2f}")
    d = a["drift"]
    axes[1].plot(d.bin_center, d.mean, "o", ms=3, color=col, label=f"k={k}: mean L_t")
    axes[1].plot(d.bin_center, d.neg_cum_kl, "--", color=col, label=f"k={k}: −Σ KL(μ‖π)")
kmax = max(analysis) if analysis else None
if kmax is not None:
    for w, c in analysis[kmax]["clip"].items():
        axes[2].plot(c.bin_center, 100 * c.clip_rate, "o-", ms=3, color=estimator_color(w),
                     label=f"{estimator_label(w)} (k={kmax})")
axes[0].set(xlabel="position t (tokens)", ylabel="sd of L_t (nats)", title="spread of the cumulative log-ratio")
axes[1].set(xlabel="position t (tokens)", ylabel="L_t (nats)", title="drift: binned mean against −Σ KL")
axes[2].set(xlabel="position t (tokens)", ylabel="advantage-aware clip rate (%)", title="clip rate by position")
for ax in axes:
    ax.legend(fontsize=7)
fig.suptitle(f"{cfg['model']}: held-out responses, π = μ after k stale updates (bins of {cfg['bin_width']} tokens)")
fig.tight_layout()

# %% [markdown]
# With SmolLM2 and longer responses this is the analogue of the paper's Figure 1 (top: σ̂√t against the binned
# spread; bottom: the clip rate of the two windows by position); the middle panel adds what the paper does not
# show — the downward drift of L_t, measured against the exact −Σ KL.
#
# Other sources of off-policyness (sampling temperature, bf16 scoring, two checkpoints) are in
# `ctpo_lab.llm.offpolicy` and `python -m ctpo_lab.llm --source ...`.

# %% [markdown]
# ## 5 · Estimator bias and variance against an on-policy reference
#
# The statistics above describe the *weights*. What a trainer feels is the *gradient* each estimator produces.
# A real model lets us do what the paper could not: sample from the target π itself, so that the on-policy
# gradient is estimated from π's own responses and each off-policy estimator (token, cumulative, sequence,
# GSPO, and the clipped presets) is compared with it. Gradients live in a 10⁵–10⁸-dimensional space; they are
# projected on K random Gaussian directions by forward-mode differentiation (one pass gives every token's
# directional derivative of log π), and norms are estimated from the projections (E_v⟨a, v⟩⟨b, v⟩ = ⟨a, b⟩).
#
# `python -m ctpo_lab.llm bias` does all of it; here on a small budget. The table's `noise_scale` B is the number of
# prompt groups at which the reference gradient's signal equals its noise: relative biases are resolved only
# with many more than B prompt groups, while `bias_to_noise` (squared bias in units of one group's reference
# variance) and the variance ratios are measurable with few.

# %%
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from ctpo_lab.llm.bias_run import BiasConfig, run_bias  # noqa: E402

bias_cfg = BiasConfig(model=cfg["model"], out=str(Path(tempfile.mkdtemp()) / "bias"), train_prompts=8,
                      eval_prompts=8 if SMALL else 16, group_size=4, max_new_tokens=32 if SMALL else 128,
                      k=[1, 4] if SMALL else [1, 4, 15], lr=cfg["lr"], minibatches=cfg["minibatches"],
                      sources=["stale"], directions=8 if SMALL else 16, params="last", n_boot=200,
                      chain_seeds=2 if SMALL else 5, chain_max_horizon=16, threads=1 if SMALL else 2, progress=False)
bias_summary = run_bias(bias_cfg)
bias_table = pd.read_csv(Path(bias_cfg.out) / "table.csv")
bias_table[["source", "estimator", "bias_to_noise", "bias_to_noise_lo", "bias_to_noise_hi", "var_ratio",
            "var_ratio_lo", "var_ratio_hi", "noise_scale", "dropped_fraction"]]

# %%
from IPython.display import Image, display  # noqa: E402

display(Image(filename=str(Path(bias_cfg.out) / "bias_noise_variance.png")))
display(Image(filename=str(Path(bias_cfg.out) / "ratio_profiles.png")))

# %% [markdown]
# Hollow markers are the exact laboratory's prediction for random Markov chains with the same per-token KL
# (`ctpo_lab.markov.prediction`). The ratio profiles check the pipeline: E_μ[ρ_{1:t}] must be 1 at every t
# (the cumulative weight is a martingale under μ, stopped at the end of the response).

# %%
print(f"notebook ran in {time.time() - START:.1f} s (SMALL={SMALL}, model={cfg['model']})")
