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
# # 01 · A tour of the exact laboratory
#
# `ctpo_lab.markov` is a synthetic autoregressive "language model" small enough that every expectation can be
# computed **exactly**: tokens y ∈ {0..V−1}, a fixed horizon T, a policy that sees the last k tokens (its
# *context*), and a terminal reward read by a finite automaton. A behaviour policy μ samples the data, a target
# policy π is being optimised, and the per-token mismatch between them is set to a chosen KL(μ‖π).
#
# Every estimator studied in the CTPO paper is a sum over tokens of a weight times the score ψ_t = ∇log π(y_t|s_t)
# times a signal S_t:
#
# | estimator | weight on token t |
# |---|---|
# | token (PPO / GRPO) | r_t = π(y_t\|s_t)/μ(y_t\|s_t) |
# | cumulative (CTPO) | ρ_{1:t} = Π_{k≤t} r_k = e^{L_t} |
# | sequence (full IS) | ρ_{1:T} = e^{L_T} |
# | GSPO | e^{L_T/T} (geometric mean) |
#
# Dynamic programming over the small state z = (context, automaton state) gives the exact mean E_μ[X], the
# exact diagonal second moment E_μ[X_j²] (hence tr Cov X) and the true gradient ∇J(π); no sampling is involved.
# From these the notebook derives bias, variance, MSE at a batch size N and the cosine with ∇J.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ctpo_lab import markov
from ctpo_lab.markov.exact import expected_score
from ctpo_lab.style import estimator_color, estimator_label

SMALL = os.environ.get("CI") == "true" or os.environ.get("CTPO_LAB_SMALL") == "1"
ESTIMATORS = ("unclipped_token", "unclipped_cumulative", "unclipped_sequence", "unclipped_sequence_geomean")
pd.set_option("display.precision", 4)
START = time.time()

# %% [markdown]
# ## 1 · An instance
# `random_instance` draws target logits from N(0, 1) and perturbs them along a random direction, solving per
# context for the perturbation size that gives the requested KL(μ‖π). Here: V = 3 tokens, first-order
# contexts (k = 1), T = 6, and the graded reward "fraction of zeros" (`frac:0`), whose gradient does not vanish
# as T grows. `true_gradient` is ∇J with respect to the target logits table θ ∈ R^{C×V}, flattened row-major.

# %%
mdp = markov.random_instance(vocab_size=3, horizon=6, order=1, seed=0, kl=0.05, automaton="frac:0")
grad = markov.true_gradient(mdp)
J_pi, J_mu = markov.performance(mdp, "target"), markov.performance(mdp, "behaviour")
print(mdp)
print("contexts:", [mdp.context_name(c) for c in range(mdp.num_contexts)])
print("per-context KL(μ‖π):", mdp.per_token_kl().round(4), " χ²(π‖μ):", mdp.per_token_chi2().round(4))
print(f"J(π) = {J_pi:.4f}   J(μ) = {J_mu:.4f}   ‖∇J‖ = {np.linalg.norm(grad):.4f}   d = {mdp.dim} coordinates")

# %% [markdown]
# The gradient is exact, so it must agree with central finite differences of J(π) over the logits (to about
# the square of the step).

# %%
theta = np.log(mdp.target)
fd = np.zeros_like(theta)
h = 1e-5


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


for c in range(theta.shape[0]):
    for v in range(theta.shape[1]):
        up, down = theta.copy(), theta.copy()
        up[c, v] += h
        down[c, v] -= h
        fd[c, v] = (markov.performance(mdp.with_policies(target=softmax(up)), "target")
                    - markov.performance(mdp.with_policies(target=softmax(down)), "target")) / (2 * h)
print(f"max |∇J − finite differences| = {np.abs(fd.ravel() - grad).max():.2e}")

# %% [markdown]
# ## 2 · Exact moments of the four estimators
# Two signals: the **outcome reward** S_t = R − b broadcast to every token (GRPO's case, with b = J(μ), what a
# group mean estimates) and the **oracle advantage** S_t = A^π_t(s_t, y_t) (the exact target-policy advantage,
# the "token-level policy-gradient formulation" of the paper's Prop. 1).
#
# Columns: `relative_bias` = ‖E X − ∇J‖/‖∇J‖; `cosine` between E X and ∇J; `scale` = ⟨E X, ∇J⟩/‖∇J‖²;
# `trace_cov` = tr Cov X for one trajectory; `mse_N64` = ‖bias‖² + tr Cov/64, the mean squared error of the
# average of 64 trajectories.

# %%
N = 64
rows = []
moments = {}
for signal, baseline in (("reward", J_mu), ("adv_pi", 0.0)):
    for est in ESTIMATORS:
        m = markov.exact_moments(mdp, estimator=est, signal=signal, baseline=baseline)
        moments[est, signal] = m
        rows.append(m.summary(N))
table = pd.DataFrame(rows).set_index(["signal", "estimator"])
table[["relative_bias", "cosine", "scale", "trace_cov", "var_along_grad", f"mse_N{N}"]]

# %% [markdown]
# The table shows the paper's picture and its caveat at once: with the oracle advantage the cumulative and the
# sequence weights are unbiased while the token weight is not; with the outcome reward only the full sequence
# weight is unbiased, and it pays for that with the largest trace covariance.
#
# ## 3 · DP against brute-force enumeration
# `enumerate_moments` sums over all V^T sequences with their μ-probabilities: the ground truth the dynamic
# programme must reproduce to rounding error.

# %%
checks = []
for est, signal in (("unclipped_cumulative", "reward"), ("unclipped_token", "adv_pi"),
                    ("unclipped_sequence_geomean", "reward")):
    baseline = J_mu if signal == "reward" else 0.0
    dp = moments[est, signal]
    en = markov.enumerate_moments(mdp, estimator=est, signal=signal, baseline=baseline)
    checks.append({"estimator": est, "signal": signal, "sequences": mdp.vocab_size**mdp.horizon,
                   "max |Δ mean|": np.abs(dp.mean - en.mean).max(),
                   "max |Δ E X²|": np.abs(dp.second_moment_diag - en.second_moment_diag).max(),
                   "|Δ tr Cov|": abs(dp.trace_cov - en.trace_cov)})
pd.DataFrame(checks)

# %% [markdown]
# Monte Carlo agrees too, within its standard errors (per-coordinate z-scores against a Bonferroni threshold).

# %%
mc = markov.monte_carlo_moments(mdp, estimator="unclipped_cumulative", signal="reward", baseline=J_mu,
                                n=20_000 if SMALL else 200_000, seed=0)
print(mc.check(moments["unclipped_cumulative", "reward"]))

# %% [markdown]
# ## 4 · Prop. 1 and where it stops
# **Prop. 1**: for a signal that depends only on the prefix and the current token, E_μ[ρ_{1:t} g_t] = E_π[g_t].
# So the cumulative estimator with A^π (or Q^π − b) is unbiased for ∇J, term by term. The token ratio corrects
# the action but keeps μ's distribution of prefixes: its position-1 term is unbiased (there is no prefix yet),
# later terms are not.

# %%
pv = markov.policy_values(mdp, "target")
per_pos = []
for t in range(1, mdp.horizon + 1):
    occ = np.zeros_like(pv.occupancy)
    occ[t - 1] = pv.occupancy[t - 1]
    ref = expected_score(mdp, occ, pv.adv)  # E_π[ψ_t A^π_t], the t-th term of ∇J
    row = {"t": t}
    for est in ("unclipped_token", "unclipped_cumulative"):
        m = markov.exact_moments(mdp, est, "adv_pi", positions=[t], second_moment=False, along_gradient=False)
        row[f"{est}: ‖bias_t‖/‖term_t‖"] = np.linalg.norm(m.mean - ref) / np.linalg.norm(ref)
    per_pos.append(row)
pd.DataFrame(per_pos).set_index("t")

# %% [markdown]
# **The outcome-reward caveat.** GRPO broadcasts R − b to every token. That signal depends on how μ continues
# after token t, so E[R − b | s_t, y_t] = Q^μ_t − b, not Q^π_t − b. The exact decomposition (docs/theory.md §3.3):
#
# * E g_tok − ∇J = **state part** Σ_t Σ_z (d^μ_t − d^π_t)(z) Σ_y π ψ (Q^μ_t − b) + **continuation part**
#   Σ_t E_{d^π_t, π}[ψ (Q^μ_t − Q^π_t)];
# * E g_cum − ∇J = continuation part only: the cumulative ratio removes exactly the state part.
#
# `bias_decomposition` computes both parts from value tables; the check below compares them with the biases of
# the exact moments.

# %%
parts = markov.bias_decomposition(mdp, baseline=J_mu)
gnorm = np.linalg.norm(grad)
dec = pd.DataFrame({
    "‖part‖/‖∇J‖": {k: np.linalg.norm(v) / gnorm for k, v in parts.items()},
})
print(dec)
err_tok = np.abs(moments["unclipped_token", "reward"].bias - parts["token_bias"]).max()
err_cum = np.abs(moments["unclipped_cumulative", "reward"].bias - parts["cumulative_bias"]).max()
print(f"max |token bias − (state + continuation)| = {err_tok:.2e}")
print(f"max |cumulative bias − continuation|      = {err_cum:.2e}")

# %% [markdown]
# ## 5 · Prop. 2 per term, and the sum-ordering counterexample
# Prop. 2(i): for every token term, Var(ρ_{1:t} g_t) ≤ Var(ρ_{1:T} g_t), because ρ_{1:T} = ρ_{1:t}·ρ_{t+1:T}
# and the suffix ratio has conditional mean 1. It does **not** follow that the whole estimator has a smaller
# trace covariance: the covariances *between* terms also change. Random V = 2, k = 1, T = 5 instances with the
# oracle signal A^π show the sum ordering tr Cov(cum) ≤ tr Cov(seq) failing on a fraction of draws.

# %%
draws = 200 if SMALL else 500
ratios = np.empty(draws)
for s in range(draws):
    inst = markov.random_instance(2, 5, 1, seed=s, kl=0.1)
    cum = markov.exact_moments(inst, "unclipped_cumulative", "adv_pi", along_gradient=False).trace_cov
    seq = markov.exact_moments(inst, "unclipped_sequence", "adv_pi", along_gradient=False).trace_cov
    ratios[s] = cum / seq
worst = int(np.argmax(ratios))
print(f"{draws} draws: tr Cov(cum) > tr Cov(seq) in {np.mean(ratios > 1):.0%}; largest ratio {ratios.max():.3f} "
      f"(seed {worst})")

inst = markov.random_instance(2, 5, 1, seed=worst, kl=0.1)
per_term = []
for t in range(1, inst.horizon + 1):
    vs = markov.exact_moments(inst, "unclipped_sequence", "adv_pi", positions=[t], along_gradient=False).variance_diag
    vc = markov.exact_moments(inst, "unclipped_cumulative", "adv_pi", positions=[t], along_gradient=False).variance_diag
    per_term.append({"t": t, "tr Var(seq term t)": vs.sum(), "tr Var(cum term t)": vc.sum(),
                     "min_j [Var seq − Var cum]": (vs - vc).min()})
print("per-term variances on that instance (Prop. 2(i): every row has min_j ≥ 0; the terms coincide at t = T)")
print(pd.DataFrame(per_term).set_index("t").to_string())
tc = {e: markov.exact_moments(inst, e, "adv_pi", along_gradient=False).trace_cov
      for e in ("unclipped_cumulative", "unclipped_sequence")}
print(f"whole estimator: tr Cov(cum) = {tc['unclipped_cumulative']:.4g}, tr Cov(seq) = {tc['unclipped_sequence']:.4g} "
      "(the cross-terms between positions decide the sum)")

fig, ax = plt.subplots(figsize=(5, 3))
ax.hist(ratios, bins=30, color=estimator_color("unclipped_cumulative"), alpha=0.8)
ax.axvline(1.0, color="k", lw=1, ls="--")
ax.set(xlabel="tr Cov(cumulative) / tr Cov(sequence)  (one trajectory, signal A^π)", ylabel="number of instances",
       title="V=2, k=1, T=5, KL=0.1 per token")
fig.tight_layout()

# %% [markdown]
# ## 6 · Bias and variance against the horizon
# The same first-order chain at a small per-token KL, for growing T, outcome reward with b = J(μ). Both axes are
# normalised by ‖∇J‖ (relative bias, and tr Cov/‖∇J‖²), so the curves are dimensionless and comparable across T.

# %%
horizons = (2, 4, 8, 16, 32, 64) if SMALL else (2, 4, 8, 16, 32, 64, 128)
sweep = []
for T in horizons:
    inst = markov.random_instance(3, T, 1, seed=0, kl=0.01, automaton="frac:0")
    b = markov.performance(inst, "behaviour")
    for est in ESTIMATORS:
        m = markov.exact_moments(inst, est, "reward", baseline=b, along_gradient=False)
        g2 = float(m.gradient @ m.gradient)
        sweep.append({"T": T, "estimator": est, "relative_bias": m.relative_bias, "cosine": m.cosine,
                      "rel_trace_cov": m.trace_cov / g2, "rel_mse_N64": m.mse(N) / g2})
sweep = pd.DataFrame(sweep)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for est, df in sweep.groupby("estimator", sort=False):
    kw = {"color": estimator_color(est), "label": estimator_label(est), "marker": "o"}
    axes[0].plot(df["T"], df.relative_bias, **kw)
    axes[1].plot(df["T"], df.rel_trace_cov, **kw)
    axes[2].plot(df["T"], df.rel_mse_N64, **kw)
axes[0].set(ylabel="‖E X − ∇J‖ / ‖∇J‖  (relative bias)", ylim=(0, None))
axes[1].set(ylabel="tr Cov X / ‖∇J‖²  (one trajectory)", yscale="log")
axes[2].set(ylabel=f"MSE of the mean of N={N} / ‖∇J‖²", yscale="log")
for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xticks(horizons, [str(T) for T in horizons])
    ax.set_xlabel("horizon T (tokens)")
axes[0].legend(fontsize=8)
fig.suptitle("exact, V=3, k=1, KL(μ‖π)=0.01 per token, outcome reward with b = J(μ)")
fig.tight_layout()
sweep.pivot(index="T", columns="estimator", values=["relative_bias", "rel_trace_cov"])

# %% [markdown]
# The sequence weight has zero bias (up to rounding error) and the
# fastest-growing variance; the token and GSPO weights have a bias that does not shrink with T; the cumulative
# weight sits in between on both axes. Which estimator has the smallest MSE depends on N and T, as the right
# panel shows.
#
# More: `python -m ctpo_lab.markov` runs the standard study (every fact of docs/theory.md §6 as a table, sweeps over
# T and the mismatch), and `python -m ctpo_lab.figures` draws the `markov_*` figures from it.

# %%
print(f"notebook ran in {time.time() - START:.1f} s (SMALL={SMALL})")
