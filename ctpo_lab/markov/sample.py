"""Vectorised Monte Carlo sampler with confidence intervals (an independent check of the exact DPs).

Trajectories ``y ~ μ`` are drawn by inverse-CDF sampling on the DP state tables; the estimator of each
trajectory is computed by :func:`ctpo_lab.markov.enumerate.trajectory_estimates` (the loss's own per-token
coefficients by autograd, not the DP), so every :class:`ctpo_lab.losses.LossConfig` is accepted, including the
configurations the exact DP refuses. Means get per-coordinate standard errors; a check against exact values uses
z-scores with a Bonferroni threshold. Sample variances of heavy-tailed weights under-estimate, so the
trace-of-covariance CI (batch means) should be trusted only when the exact fourth moment is moderate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from ctpo_lab import losses

from .dp import signal_tables
from .enumerate import old_policy_table, trajectory_estimates
from .estimator import ChainEstimator
from .exact import Moments, resolve_estimator
from .model import MarkovMDP

__all__ = ["sample_trajectories", "MonteCarloMoments", "monte_carlo_moments"]


def sample_trajectories(mdp: MarkovMDP, n: int, seed: int = 0, policy: str = "behaviour") -> dict[str, np.ndarray]:
    """Draw ``n`` trajectories. Returns ``seqs``, ``ctx``, ``ell``, ``log_pi``, ``log_mu`` ``[n, T]``, ``states``
    ``[n, T+1]`` (DP state ``z_t``), ``reward`` ``[n]``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError("n must be a positive int")
    rng = np.random.default_rng(seed)
    table = mdp.behaviour if policy == "behaviour" else mdp.target
    cdf = np.cumsum(table, axis=1)
    cdf[:, -1] = 1.0
    T = mdp.horizon
    z = np.full(n, mdp.start_state, dtype=np.int64)
    seqs = np.zeros((n, T), dtype=np.int64)
    ctx = np.zeros((n, T), dtype=np.int64)
    states = np.zeros((n, T + 1), dtype=np.int64)
    states[:, 0] = z
    for t in range(T):
        c = mdp.state_context[z]
        u = rng.random(n)
        y = (u[:, None] > cdf[c]).sum(axis=1)
        y = np.minimum(y, mdp.vocab_size - 1)
        seqs[:, t], ctx[:, t] = y, c
        z = mdp.next_state[z, y]
        states[:, t + 1] = z
    with np.errstate(divide="ignore"):
        log_pi, log_mu = np.log(mdp.target[ctx, seqs]), np.log(mdp.behaviour[ctx, seqs])
    ell = log_pi - log_mu
    return {"seqs": seqs, "ctx": ctx, "ell": ell, "log_pi": log_pi, "log_mu": log_mu, "states": states,
            "reward": mdp.state_reward[states[:, -1]]}


@dataclass
class MonteCarloMoments:
    """Monte Carlo estimates with standard errors.

    Attributes
    ----------
    mean, mean_se : ``[d]``; second_moment_diag, second_moment_se : ``[d]``; trace_cov, trace_cov_se: floats
    (batch-means standard error); n: sample size; batch_size: for batch-level estimators the number of
    trajectories per loss evaluation (the moments are those of one trajectory's contribution within such a
    batch, the standard errors come from the independent batches), None otherwise.
    """

    estimator: str
    signal: str
    n: int
    mean: np.ndarray
    mean_se: np.ndarray
    second_moment_diag: np.ndarray
    second_moment_se: np.ndarray
    trace_cov: float
    trace_cov_se: float
    batch_size: int | None = None

    @property
    def method(self) -> str:
        """``"mc"`` or ``"mc-batch(B)"``."""
        return "mc" if self.batch_size is None else f"mc-batch({self.batch_size})"

    def mean_ci(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        zq = stats.norm.ppf(0.5 + level / 2)
        return self.mean - zq * self.mean_se, self.mean + zq * self.mean_se

    def trace_cov_ci(self, level: float = 0.95) -> tuple[float, float]:
        zq = stats.norm.ppf(0.5 + level / 2)
        return self.trace_cov - zq * self.trace_cov_se, self.trace_cov + zq * self.trace_cov_se

    def check(self, exact: Moments, alpha: float = 1e-3) -> dict[str, float | bool]:
        """Per-coordinate z-scores against exact values with a Bonferroni threshold over coordinates.

        ``holds`` refers to the means. Second moments are reported separately (``holds_second``): their
        standard errors come from the sample fourth moment, which under-estimates for heavy-tailed weights, so
        they are not part of ``holds``."""
        ok = self.mean_se > 0
        zm = np.abs(self.mean - exact.mean)[ok] / self.mean_se[ok]
        thr = float(stats.norm.ppf(1 - alpha / (2 * max(1, int(ok.sum())))))
        ok2 = self.second_moment_se > 0
        z2 = np.abs(self.second_moment_diag - exact.second_moment_diag)[ok2] / self.second_moment_se[ok2]
        zt = abs(self.trace_cov - exact.trace_cov) / self.trace_cov_se if self.trace_cov_se > 0 else 0.0
        zmax, z2max = float(zm.max(initial=0.0)), float(z2.max(initial=0.0))
        return {"max_abs_z": zmax, "max_abs_z_second": z2max, "threshold": thr, "trace_z": float(zt),
                "holds": bool(zmax <= thr), "holds_second": bool(z2max <= thr)}


def monte_carlo_moments(
    mdp: MarkovMDP,
    estimator: str | losses.LossConfig | ChainEstimator = "unclipped_cumulative",
    signal: str = "reward",
    baseline: float = 0.0,
    *,
    n: int = 100_000,
    seed: int = 0,
    chunk_size: int = 20_000,
    batches: int = 20,
    batch_size: int = 64,
    old_policy: np.ndarray | None = None,
    rollout_correction: object = None,
    **overrides: object,
) -> MonteCarloMoments:
    """Monte Carlo moments of ``X = Σ_t c_t ψ_t S_t`` from ``n`` trajectories of ``μ`` (oracle signals from
    the exact value tables), ``c_t`` the loss's own coefficients with the real log π and log μ of each token.

    Per-trajectory estimators (every rule and mask but the batch-level ones) are evaluated one trajectory at a
    time, as the DP and enumeration do; ``batch_size`` is then not used. Batch-level estimators
    (:attr:`ChainEstimator.batch_level`: ``clip_cov``, ``kl_cov``, ``m2po``, …) are evaluated on consecutive
    batches of ``batch_size`` i.i.d. trajectories (default 64, a training batch; ``n`` is rounded up to whole
    batches): ``X`` is then one trajectory's contribution within a batch of that size (the batch's gradient is
    the mean of its rows' ``X``), so ``mean`` is the expected batch gradient, ``trace_cov`` the per-row
    variance, and the standard errors come from batch means (rows of one batch are dependent). Rules that draw
    random tokens (``clip_cov``'s ``torch.randperm``) use torch's generator seeded from ``seed`` (forked: the
    global generator is left as it was).

    Three policies (:mod:`ctpo_lab.markov.three_policy`): trajectories come from ``mdp.behaviour`` = π_roll,
    ``old_policy`` ``[C, V]`` is π_old and ``rollout_correction`` a correction; each trajectory's estimator is
    −∇ policy_loss(log π, log π_old, ..., rollout_log_prob=log π_roll, rollout_correction=...). A batch-normalised
    correction (``rollout_is_batch_normalize``) is batch-level: evaluated on batches of ``batch_size``.
    """
    from ctpo_lab.rollout_correction import resolve_rollout_correction

    est = resolve_estimator(estimator, signal, overrides)
    corr = resolve_rollout_correction(rollout_correction)
    old_tab = None if old_policy is None else old_policy_table(mdp, old_policy)
    if corr is not None and old_tab is None:
        raise ValueError("old_policy: a rollout_correction needs old_policy (the trainer's π_old table)")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    B = None
    if est.batch_level or (corr is not None and corr.rollout_is_batch_normalize):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        B = int(batch_size)
        n = -(-int(n) // B) * B
        chunk_size = max(B, (int(chunk_size) // B) * B)
    S_tab = signal_tables(mdp, signal, baseline)
    d = mdp.dim
    rng_seeds = np.random.SeedSequence(seed).spawn(int(np.ceil(n / chunk_size)))
    s1, s2, s4 = np.zeros(d), np.zeros(d), np.zeros(d)
    b1, b2, bn = np.zeros((batches, d)), np.zeros((batches, d)), np.zeros(batches)
    g1, g2, g11, g22 = np.zeros(d), np.zeros(d), np.zeros(d), np.zeros(d)  # batch means (batch-level rules)
    done = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        for ss in rng_seeds:
            m = min(chunk_size, n - done)
            tr = sample_trajectories(mdp, m, int(ss.generate_state(1)[0]))
            if S_tab is None:
                S = np.repeat((tr["reward"] - baseline)[:, None], mdp.horizon, axis=1)
            else:
                tt = np.arange(mdp.horizon)[None, :]
                S = S_tab[tt, tr["states"][:, :-1], tr["seqs"]]
            if old_tab is None:
                X = trajectory_estimates(mdp, tr["seqs"], tr["ctx"], tr["ell"], S, est, log_prob=tr["log_pi"],
                                         old_log_prob=tr["log_mu"], batch_size=B)
            else:
                with np.errstate(divide="ignore"):
                    log_old = np.log(old_tab[tr["ctx"], tr["seqs"]])
                X = trajectory_estimates(mdp, tr["seqs"], tr["ctx"], tr["log_pi"] - log_old, S, est,
                                         log_prob=tr["log_pi"], old_log_prob=log_old, batch_size=B,
                                         rollout_log_prob=tr["log_mu"] if corr is not None else None,
                                         rollout_correction=corr)
            X2 = X**2
            s1 += X.sum(0)
            s2 += X2.sum(0)
            s4 += (X2**2).sum(0)
            if B is not None:
                xm, x2m = X.reshape(-1, B, d).mean(1), X2.reshape(-1, B, d).mean(1)
                g1 += xm.sum(0)
                g11 += (xm**2).sum(0)
                g2 += x2m.sum(0)
                g22 += (x2m**2).sum(0)
            bid = ((np.arange(m) + done) * batches) // n  # contiguous batches of the sample
            for j in np.unique(bid):
                sel = bid == j
                b1[j] += X[sel].sum(0)
                b2[j] += X2[sel].sum(0)
                bn[j] += sel.sum()
            done += m
    mean = s1 / n
    sec = s2 / n
    var = np.maximum(sec - mean**2, 0.0)
    if B is None:
        mean_se = np.sqrt(var / n)
        sec_se = np.sqrt(np.maximum(s4 / n - sec**2, 0.0) / n)
    else:  # independent batches: the standard errors of their means
        nb = n // B
        mean_se = np.sqrt(np.maximum(g11 / nb - (g1 / nb) ** 2, 0.0) / nb)
        sec_se = np.sqrt(np.maximum(g22 / nb - (g2 / nb) ** 2, 0.0) / nb)
    trace = float(var.sum() * n / max(n - 1, 1))
    okb = bn > 1
    btr = (b2[okb] / bn[okb, None] - (b1[okb] / bn[okb, None]) ** 2).sum(axis=1)
    trace_se = float(btr.std(ddof=1) / np.sqrt(okb.sum())) if okb.sum() > 1 else float("nan")
    return MonteCarloMoments(est.name, signal, n, mean, mean_se, sec, sec_se, trace, trace_se, batch_size=B)
