"""Markov lab: dynamic programmes against enumeration, finite differences and Monte Carlo."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctpo_lab import markov
from ctpo_lab.markov.augmented import log_ratio_distribution_profile
from ctpo_lab.markov.dp import transition_tables

INSTANCES = [
    # (V, T, k, automaton, kl, seed)
    (2, 5, 1, "count", 0.1, 0),
    (2, 6, 0, "parity", 0.05, 1),
    (3, 4, 2, "contains:0-1", 0.1, 2),
    (3, 5, 1, "sum:3", 0.02, 3),
    (2, 7, 3, "contains:1-1-0", 0.2, 4),
    (4, 4, 1, "count:2:3", 0.05, 5),
    (3, 5, 0, "frac:1", 0.1, 6),
    (2, 8, 2, "frac:0", 0.3, 7),
]


def _rel(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


@pytest.mark.parametrize("inst", INSTANCES, ids=[f"V{i[0]}T{i[1]}k{i[2]}-{i[3]}" for i in INSTANCES])
def test_dp_equals_enumeration_all_estimators_and_signals(inst):
    V, T, k, auto, kl, seed = inst
    mdp = markov.random_instance(V, T, k, seed=seed, kl=kl, automaton=auto)
    np.testing.assert_allclose(markov.true_gradient(mdp), markov.enumerate_gradient(mdp), rtol=0, atol=1e-13)
    worst = 0.0
    for est in markov.STUDY_ESTIMATORS:
        for sig in markov.SIGNALS:
            if est == "gspo" and sig != "reward":
                continue  # sequence-level sign mask with a per-token signal: the DP refuses it (tested below)
            b = 0.37 if sig in ("reward", "q_pi", "q_mu") else 0.0
            dp = markov.exact_moments(mdp, est, sig, baseline=b)
            en = markov.enumerate_moments(mdp, est, sig, baseline=b)
            # the mean is compared relative to its own size, floored at 1e-3 of the estimator's rms (parity
            # rewards make some means tiny by cancellation)
            scale = max(np.abs(en.mean).max(), 1e-3 * np.sqrt(en.second_moment_diag.max()))
            errs = [np.abs(dp.mean - en.mean).max() / scale, _rel(dp.second_moment_diag, en.second_moment_diag),
                    abs(dp.trace_cov - en.trace_cov) / abs(en.trace_cov),
                    abs(dp.var_along_grad - en.var_along_grad) / abs(en.var_along_grad)]
            worst = max(worst, *errs)
            assert max(errs) <= 1e-10, (est, sig, errs)
    assert worst <= 1e-10


def test_clip_masks_are_active_in_the_comparison():
    """The clipped estimators differ from their unclipped parents on these instances (masks do bite)."""
    mdp = markov.random_instance(3, 5, 1, seed=3, kl=0.1)
    cumulative_ppo = markov.chain_estimator("grpo", name="cumulative_ppo", ratio="cumulative")
    for clipped, plain in (("grpo", "unclipped_token"), (cumulative_ppo, "unclipped_cumulative"),
                           ("ctpo", "unclipped_cumulative"), ("gspo", "unclipped_sequence_geomean")):
        a = markov.exact_moments(mdp, clipped, "reward", 0.3, along_gradient=False)
        b = markov.exact_moments(mdp, plain, "reward", 0.3, along_gradient=False)
        assert _rel(a.mean, b.mean) > 1e-3


def test_positions_subset_sums_to_full():
    mdp = markov.random_instance(3, 5, 1, seed=1, kl=0.05)
    full = markov.exact_moments(mdp, "unclipped_cumulative", "reward", 0.2, along_gradient=False)
    parts = sum(markov.exact_moments(mdp, "unclipped_cumulative", "reward", 0.2, positions=[t],
                                     along_gradient=False).mean for t in range(1, 6))
    np.testing.assert_allclose(parts, full.mean, atol=1e-14)
    en = markov.enumerate_moments(mdp, "unclipped_cumulative", "reward", 0.2, positions=[2, 4])
    dp = markov.exact_moments(mdp, "unclipped_cumulative", "reward", 0.2, positions=[2, 4])
    assert _rel(dp.second_moment_diag, en.second_moment_diag) < 1e-10


def _fd_gradient(mdp, h=1e-5):
    logits = np.log(mdp.target)
    g = np.zeros(mdp.dim)
    for idx in range(mdp.dim):
        c, v = divmod(idx, mdp.vocab_size)
        vals = []
        for s in (+1, -1):
            lg = logits.copy()
            lg[c, v] += s * h
            p = np.exp(lg - lg.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            vals.append(markov.performance(mdp.with_policies(target=p)))
        g[idx] = (vals[0] - vals[1]) / (2 * h)
    return g


@pytest.mark.parametrize("V,T,k,auto", [(3, 6, 1, "contains:0-1"), (2, 8, 2, "count:1:3"), (4, 5, 0, "frac:2")])
def test_gradient_matches_finite_differences(V, T, k, auto):
    mdp = markov.random_instance(V, T, k, seed=11, kl=0.05, automaton=auto)
    g = markov.true_gradient(mdp)
    fd = _fd_gradient(mdp)
    np.testing.assert_allclose(g, fd, atol=1e-9 * max(1.0, np.abs(g).max()))


def test_mean_only_path_matches_full_dp():
    mdp = markov.random_instance(4, 10, 2, seed=0, kl=0.02, automaton="contains:0-1")
    for est in ("unclipped_token", "unclipped_cumulative", "unclipped_sequence", "unclipped_sequence_geomean", "grpo",
                "cispo"):
        a = markov.exact_moments(mdp, est, "reward", 0.4, along_gradient=False)
        b = markov.exact_moments(mdp, est, "reward", 0.4, second_moment=False, along_gradient=False)
        assert _rel(b.mean, a.mean) < 1e-12
        assert np.all(np.isnan(b.second_moment_diag))


def test_moments_helpers():
    mdp = markov.random_instance(3, 5, 1, seed=2, kl=0.05)
    m = markov.exact_moments(mdp, "unclipped_token", "reward", 0.3)
    np.testing.assert_allclose(m.bias, m.mean - m.gradient)
    assert m.mse(10) == pytest.approx(m.bias_norm**2 + m.trace_cov / 10)
    assert m.mse(1) > m.mse(100) > m.bias_norm**2
    assert -1 <= m.cosine <= 1
    assert m.var_along_grad <= m.trace_cov + 1e-12
    with pytest.raises(ValueError):
        m.mse(0)


def test_binned_augmented_converges_to_exact():
    mdp = markov.random_instance(3, 7, 1, seed=4, kl=0.05)
    exact = markov.exact_moments(mdp, "ctpo", "reward", 0.3, along_gradient=False)
    errs = []
    for w in (0.05, 0.01, 0.002):
        b = markov.exact_moments(mdp, "ctpo", "reward", 0.3, bin_width=w, along_gradient=False)
        errs.append(_rel(b.mean, exact.mean))
    assert errs[-1] < 0.05
    assert errs[-1] <= errs[0] + 1e-12


def test_position_moments_match_enumeration():
    mdp = markov.random_instance(3, 6, 1, seed=8, kl=0.1, automaton="sum:3")
    prof = markov.position_moments(mdp)
    tr = markov.enumerate_trajectories(mdp)
    L = np.cumsum(tr["ell"], axis=1)
    p = tr["p_mu"]
    mean_L = p @ L
    var_L = p @ L**2 - mean_L**2
    rho = np.exp(L)
    np.testing.assert_allclose(prof["mean_L"], mean_L, atol=1e-13)
    np.testing.assert_allclose(prof["var_L"], var_L, atol=1e-13)
    np.testing.assert_allclose(prof["mean_rho"], p @ rho, atol=1e-13)
    np.testing.assert_allclose(prof["var_rho"], p @ rho**2 - (p @ rho) ** 2, rtol=1e-12)


def test_exact_clip_rates_match_enumeration_and_binning_converges():
    mdp = markov.random_instance(3, 7, 1, seed=9, kl=0.05)
    win = {"adaptive": markov.chain_estimator("sqrt_t_window", eps_low=0.05, eps_high=0.1).config,
           "fixed": "fixed_window", "ctpo": "ctpo"}
    ex = log_ratio_distribution_profile(mdp, win)
    tr = markov.enumerate_trajectories(mdp)
    L = np.cumsum(tr["ell"], axis=1)
    t = np.arange(1, 8)
    hi = (tr["p_mu"][:, None] * (L > 0.1 * np.sqrt(t))).sum(0)
    lo = (tr["p_mu"][:, None] * (L < -0.05 * np.sqrt(t))).sum(0)
    np.testing.assert_allclose(ex["adaptive_high"], hi, atol=1e-13)
    np.testing.assert_allclose(ex["adaptive_low"], lo, atol=1e-13)
    fixed_hi = (tr["p_mu"][:, None] * (L > np.log(5.0))).sum(0)
    np.testing.assert_allclose(ex["fixed_high"], fixed_hi, atol=1e-13)
    # ctpo's dual bound e^{0.05√t} counts as a clip for A < 0
    ctpo_lo = (tr["p_mu"][:, None] * ((L < -0.025 * np.sqrt(t)) | (L > 0.05 * np.sqrt(t)))).sum(0)
    np.testing.assert_allclose(ex["ctpo_low"], ctpo_lo, atol=1e-13)
    errs = [np.abs(log_ratio_distribution_profile(mdp, win, bin_width=w)["adaptive_rate"] - ex["adaptive_rate"]).max()
            for w in (1e-2, 1e-4)]
    assert errs[1] < 0.02 and errs[1] <= errs[0]


def test_monte_carlo_agrees_within_ci_on_a_larger_instance():
    mdp = markov.random_instance(4, 12, 1, seed=3, kl=0.02, automaton="frac:0")  # 4^12 = 1.7e7: not enumerable
    for est, sig in (("unclipped_cumulative", "reward"), ("unclipped_token", "adv_pi"), ("ctpo", "reward")):
        b = 0.25 if sig == "reward" else 0.0
        ex = markov.exact_moments(mdp, est, sig, baseline=b, along_gradient=False,
                                  bin_width=1e-4 if est == "ctpo" else None)
        mc = markov.monte_carlo_moments(mdp, est, sig, baseline=b, n=40_000, seed=1)
        chk = mc.check(ex, alpha=1e-3) if est != "ctpo" else None
        if chk is not None:
            assert chk["holds"], chk
            lo, hi = mc.trace_cov_ci(0.999)
            assert lo <= ex.trace_cov <= hi
        else:  # binned approximation: the mean only, with a small allowance for the binning error
            z = np.abs(mc.mean - ex.mean) / np.maximum(mc.mean_se, 1e-12)
            assert np.max(z) < 6


@pytest.mark.parametrize("k", [0, 1, 2])
def test_variable_length_dp_equals_enumeration(k):
    mdp = markov.random_instance(3, 5, k, seed=k, kl=0.1, done_token=1, done_logit=-0.5, automaton="frac:0")
    np.testing.assert_allclose(markov.true_gradient(mdp), markov.enumerate_gradient(mdp), atol=1e-13)
    for est in ("unclipped_token", "unclipped_cumulative", "unclipped_sequence", "cumulative_tis", "grpo", "ctpo"):
        for sig in ("reward", "adv_pi", "q_mu"):
            dp = markov.exact_moments(mdp, est, sig, baseline=0.2)
            en = markov.enumerate_moments(mdp, est, sig, baseline=0.2)
            assert _rel(dp.mean, en.mean) < 1e-10, (est, sig)
            assert _rel(dp.second_moment_diag, en.second_moment_diag) < 1e-10, (est, sig)
    prof = markov.position_moments(mdp)
    tr = markov.enumerate_trajectories(mdp)
    p = tr["p_mu"]
    alive = p @ (np.cumsum(tr["seqs"] == 1, axis=1) - (tr["seqs"] == 1) == 0)
    np.testing.assert_allclose(prof["alive"], alive, atol=1e-14)
    assert prof["alive"][-1] < 1


def test_variable_length_gradient_matches_finite_differences():
    mdp = markov.random_instance(3, 5, 1, seed=2, kl=0.05, done_token=0, automaton="contains:1-2")
    g = markov.true_gradient(mdp)
    live = mdp.num_contexts - 1
    logits = np.log(np.maximum(mdp.target, 1e-300))
    h = 1e-5
    for idx in range(live * 3):
        c, v = divmod(idx, 3)
        vals = []
        for s in (1, -1):
            lg = logits.copy()
            lg[c, v] += s * h
            p = mdp.target.copy()
            p[c] = np.exp(lg[c]) / np.exp(lg[c]).sum()
            vals.append(markov.performance(mdp.with_policies(target=p)))
        assert (vals[0] - vals[1]) / (2 * h) == pytest.approx(g[idx], abs=1e-9)
    assert np.all(g[live * 3 :] == 0)


def test_ctpo_log_cap_and_dual_clip_match_enumeration():
    """Tight constants so that the dual bound and the log cap both bite."""
    mdp = markov.random_instance(3, 6, 1, seed=12, kl=0.2)
    tight = dict(eps_low=0.2, eps_high=0.3, dual_clip=0.1, max_log_weight=0.4)
    dp = markov.exact_moments(mdp, "ctpo", "adv_pi", **tight)
    en = markov.enumerate_moments(mdp, "ctpo", "adv_pi", **tight)
    assert _rel(dp.mean, en.mean) < 1e-10 and _rel(dp.second_moment_diag, en.second_moment_diag) < 1e-10
    loose = markov.exact_moments(mdp, "ctpo", "adv_pi", eps_low=0.2, eps_high=0.3, dual_clip=None,
                                 max_log_weight=None)
    assert _rel(dp.mean, loose.mean) > 1e-3


@pytest.mark.parametrize("V,k,T,auto", [(5, 2, 30, "count"), (4, 1, 40, "contains:0-1"), (3, 3, 12, "sum:3")])
def test_toeplitz_second_moment_equals_forward_dp(V, k, T, auto):
    from ctpo_lab.markov import exact

    mdp = markov.random_instance(V, T, k, seed=4, kl=0.05, automaton=auto)
    tab = transition_tables(mdp)
    u = mdp.state_reward - 0.4
    for est in ("unclipped_token", "unclipped_cumulative", "unclipped_sequence", "unclipped_sequence_geomean",
                "cumulative_tis", "cispo"):
        a, b, g = markov.chain_estimator(est).tables(tab.ell, T)
        _, fwd = exact.run_moment_dp(mdp, a, b, g, exact.score_feature(mdp), u)
        fast = exact.run_second_moment_toeplitz(mdp, a, b, g, u)
        assert np.max(np.abs(fast - fwd)) <= 1e-11 * np.max(np.abs(fwd)), est
    m = markov.exact_moments(mdp, "unclipped_cumulative", "reward", 0.4, along_gradient=False)
    assert m.info["second_moment_path"] == "toeplitz"


def test_toeplitz_handles_unreachable_start_block_states():
    """k = 1 with a 3-state automaton: (BOS, q != start) states have no predecessors."""
    from ctpo_lab.markov import exact

    mdp = markov.random_instance(3, 9, 1, seed=5, kl=0.1, automaton="count:0:3")
    tab = transition_tables(mdp)
    a, b, g = markov.chain_estimator("unclipped_sequence").tables(tab.ell, 9)
    u = mdp.state_reward - 0.3
    _, fwd = exact.run_moment_dp(mdp, a, b, g, exact.score_feature(mdp), u)
    np.testing.assert_allclose(exact.run_second_moment_toeplitz(mdp, a, b, g, u), fwd, rtol=1e-11, atol=1e-15)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(V=st.integers(2, 3), T=st.integers(1, 5), k=st.integers(0, 2), seed=st.integers(0, 10_000),
       kl=st.sampled_from([0.0, 0.01, 0.2]), est=st.sampled_from(markov.STUDY_ESTIMATORS),
       sig=st.sampled_from(["reward", "adv_pi", "q_mu"]), auto=st.sampled_from(["count", "sum:3", "contains:0-1"]))
def test_property_dp_equals_enumeration(V, T, k, seed, kl, est, sig, auto):
    if est == "gspo" and sig != "reward":
        return
    mdp = markov.random_instance(V, T, k, seed=seed, kl=kl, automaton=auto)
    dp = markov.exact_moments(mdp, est, sig, baseline=0.3)
    en = markov.enumerate_moments(mdp, est, sig, baseline=0.3)
    scale = max(np.abs(en.mean).max(), 1e-3 * np.sqrt(en.second_moment_diag.max()), 1e-300)
    assert np.abs(dp.mean - en.mean).max() <= 1e-10 * scale + 1e-15
    assert np.abs(dp.second_moment_diag - en.second_moment_diag).max() <= 1e-10 * max(
        en.second_moment_diag.max(), 1e-300) + 1e-15


@pytest.mark.parametrize("V,k,T,auto", [(5, 2, 30, "count"), (4, 1, 40, "contains:0-1"), (3, 3, 12, "sum:3"),
                                        (3, 1, 9, "count:0:3")])
def test_time_dependent_toeplitz_equals_forward_dp(V, k, T, auto):
    """The general path (per-token signals, position and sign masks: β_t depends on t) on the fast path."""
    from ctpo_lab.markov import exact

    mdp = markov.random_instance(V, T, k, seed=6, kl=0.05, automaton=auto)
    tab = transition_tables(mdp)
    rng = np.random.default_rng(0)
    feat = exact.score_feature(mdp)
    for est in ("unclipped_token", "unclipped_cumulative", "unclipped_sequence", "cumulative_tis", "grpo"):
        a, b, g = markov.chain_estimator(est).tables(tab.ell, T)
        for sig in ("adv_pi", "q_mu", "reward"):
            S = exact.signal_tables(mdp, sig, 0.3)
            keep = rng.random(T) > 0.3
            bt = rng.random((T,) + a.shape) if S is None else S * keep[:, None, None]
            u = mdp.state_reward - 0.3 if S is None else np.ones(mdp.num_states)
            _, fwd = exact.run_moment_dp(mdp, a, b, g, feat, u, beta_t=bt)
            fast = exact.run_second_moment_toeplitz(mdp, a, b, g, u, beta_t=bt)
            assert np.max(np.abs(fast - fwd)) <= 1e-10 * np.max(np.abs(fwd)), (est, sig)


@pytest.mark.parametrize("est", ["unclipped_token", "unclipped_cumulative", "unclipped_sequence", "grpo", "ctpo"])
@pytest.mark.parametrize("sig", ["adv_pi", "q_pi", "reward"])
def test_general_path_exact_moments_equal_enumeration(est, sig):
    """exact_moments with per-token signals and a position mask takes the fast path and equals enumeration."""
    mdp = markov.random_instance(3, 6, 1, seed=2, kl=0.1, automaton="count")
    pos = [1, 3, 4, 6]
    dpm = markov.exact_moments(mdp, est, sig, 0.2, positions=pos)
    en = markov.enumerate_moments(mdp, est, sig, 0.2, positions=pos)
    assert _rel(dpm.mean, en.mean) < 1e-10 and _rel(dpm.second_moment_diag, en.second_moment_diag) < 1e-10
    if est.startswith("unclipped") or est == "grpo":
        assert dpm.info["second_moment_path"] == "toeplitz"
