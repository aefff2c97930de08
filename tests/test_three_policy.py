"""Three policies on the exact laboratory (sampler π_roll, trainer's recompute π_old, current π): the estimator
of a (policy-loss preset × rollout correction) pair is −∇_θ policy_loss(log π, log π_old, A, mask, preset,
rollout_log_prob=log π_roll, rollout_correction=...) on each trajectory y ~ π_roll.

The three-policy DP equals enumeration (the loss's own autograd coefficients) and autograd through
``policy_loss`` with respect to the logits table to 1e-9 on small chains for the DP-supported pairs; the pairs
it refuses raise with the alternative named, and Monte Carlo is within 5 standard errors of enumeration.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctpo_lab import markov
from ctpo_lab.losses import policy_loss
from ctpo_lab.markov.enumerate import tree_values
from ctpo_lab.rollout_correction import ROLLOUT_CORRECTIONS, RolloutCorrection

# (V, T, k, kl_roll_old, kl_old_pi, seed, roll_direction): 81 and 32 trajectories
CHAINS = [(3, 4, 1, 0.03, 0.05, 7, "noise"), (2, 5, 1, 0.02, 0.04, 3, "stale")]

_CUSTOM = {
    # thresholds that reject part of the trajectories at these mismatches (the presets' bands reject all or none)
    "geo_rs_wide": RolloutCorrection(name="geo_rs_wide", rollout_is=None, rollout_rs="seq_mean_k1",
                                     rollout_rs_threshold="0.9_1.1"),
    "seq_max_k2_tis": RolloutCorrection(name="seq_max_k2_tis", rollout_is="token", rollout_is_threshold=1.1,
                                        rollout_rs="seq_max_k2", rollout_rs_threshold=0.05),
    "token_k3_rs": RolloutCorrection(name="token_k3_rs", rollout_is="sequence", rollout_is_threshold=1.2,
                                     rollout_rs="token_k3", rollout_rs_threshold=0.02),
    "token_tis_tight": RolloutCorrection(name="token_tis_tight", rollout_is="token", rollout_is_threshold=1.05,
                                         rollout_is_threshold_lower=0.9, rollout_is_mode="truncate"),
    "seq_icepop": RolloutCorrection(name="seq_icepop", rollout_is="sequence", rollout_is_threshold="0.8_1.25"),
    "cumulative_tight": RolloutCorrection(name="cumulative_tight", rollout_is="cumulative", rollout_is_mode="mask",
                                          cumulative_eps_low=0.1, cumulative_eps_high=0.1,
                                          cumulative_exponent=0.5),
}
CORRECTIONS = [None, "decoupled_token_is", "decoupled_seq_is", "decoupled_token_icepop", "decoupled_seq_is_rs",
               "decoupled_k3_rs_token_tis", "cumulative_sqrt_t", "cumulative_fixed", "trl_sequence_mask",
               "areal_decoupled", "bypass_ppo_clip", "bypass_pg_is", *_CUSTOM]


def _chain(V, T, k, kl_ro, kl_op, seed, direction):
    return markov.three_policy_instance(V, T, k, seed=seed, kl_roll_old=kl_ro, kl_old_pi=kl_op,
                                        roll_direction=direction, automaton="frac:0")


def _corr(name):
    return _CUSTOM.get(name, name)


def autograd_moments(chain, preset, correction, signal: str, baseline: float) -> tuple[np.ndarray, np.ndarray]:
    """E[X], E[X²] of X(y) = −∇_θ policy_loss(y) over every y ~ π_roll (one copy of θ per trajectory; the rows'
    losses are summed, aggregation ``all-seq-mean-token-sum`` × n = the per-trajectory ``seq-mean-token-sum``)."""
    mdp = chain.mdp
    tr = markov.enumerate_trajectories(mdp)
    seqs, ctx, p = tr["seqs"], tr["ctx"], tr["p_mu"]
    n, T = seqs.shape
    if signal == "reward":
        adv = np.repeat((tr["reward"] - baseline)[:, None], T, axis=1)
    else:
        q, v = tree_values(mdp, mdp.target, tr["reward"])
        adv = q - v
    theta = torch.tensor(np.log(mdp.target), dtype=torch.float64)
    rows_theta = theta.expand(n, *theta.shape).clone().requires_grad_()
    log_pi = torch.log_softmax(rows_theta, dim=-1)
    rows = torch.arange(n)[:, None]
    lp = log_pi[rows, torch.as_tensor(ctx), torch.as_tensor(seqs)]
    old = torch.as_tensor(np.log(chain.old[ctx, seqs]))
    roll = torch.as_tensor(np.log(mdp.behaviour[ctx, seqs]))
    loss, _ = policy_loss(lp, old, torch.as_tensor(adv), torch.ones(n, T, dtype=torch.bool), preset=preset,
                          aggregation="all-seq-mean-token-sum", rollout_log_prob=roll if correction else None,
                          rollout_correction=correction)
    loss.backward()
    X = -(rows_theta.grad * n).reshape(n, -1).numpy()
    return p @ X, p @ X**2


def _close(a, b, ref):
    return np.abs(a - b).max() <= 1e-9 * max(np.abs(ref).max(), 1e-12)


@pytest.mark.parametrize("chain_spec", CHAINS)
@pytest.mark.parametrize("preset", ["grpo", "ctpo", "gspo"])
def test_dp_equals_enumeration_and_autograd(chain_spec, preset):
    chain = _chain(*chain_spec)
    fired = 0
    for name in CORRECTIONS:
        corr = _corr(name)
        if markov.rollout_lab_method(preset, corr) != "dp":
            assert name == "token_k3_rs" and preset != "grpo"  # token rejection shifts prefix positions
            continue
        dp = markov.rollout_exact_moments(chain, preset, corr, "reward", baseline=0.3, along_gradient=False)
        en = markov.enumerate_moments(chain.mdp, preset, "reward", 0.3, old_policy=chain.old, rollout_correction=corr)
        mean, second = autograd_moments(chain, preset, corr, "reward", 0.3)
        for m in (dp, en):
            assert _close(m.mean, mean, mean), (preset, name)
            assert _close(m.second_moment_diag, second, second), (preset, name)
        fired += int(np.abs(mean).max() > 0)
    assert fired >= len(CORRECTIONS) - 3


@pytest.mark.parametrize("preset,correction", [("grpo", "decoupled_seq_is"), ("ctpo", "cumulative_sqrt_t"),
                                                ("grpo", "token_k3_rs"), ("ctpo", None)])
def test_dp_oracle_signal(preset, correction):
    chain = _chain(*CHAINS[0])
    corr = _corr(correction)
    dp = markov.rollout_exact_moments(chain, preset, corr, "adv_pi", along_gradient=False)
    mean, second = autograd_moments(chain, preset, corr, "adv_pi", 0.0)
    assert _close(dp.mean, mean, mean) and _close(dp.second_moment_diag, second, second)


def test_rejection_and_bypass_pieces_are_exercised():
    """The custom rejections reject some but not all trajectories, so the comparisons above are not trivial."""
    chain = _chain(*CHAINS[0])
    base = markov.rollout_exact_moments(chain, "grpo", "decoupled_token_is", "reward", 0.3, along_gradient=False)
    for name in ("geo_rs_wide", "seq_max_k2_tis", "token_k3_rs"):
        m = markov.rollout_exact_moments(chain, "grpo", _CUSTOM[name], "reward", 0.3, along_gradient=False)
        assert 0 < np.abs(m.mean).max() and not np.allclose(m.mean, base.mean), name


def test_no_mismatch_reduces_to_two_policies():
    """π_roll = π_old: every correction's weight is 1 and the pair is the preset on the (π, π_old) chain."""
    chain = markov.three_policy_instance(3, 4, 1, seed=1, kl_roll_old=0.0, kl_old_pi=0.05, automaton="frac:0")
    two = chain.two_policy("old")
    for preset in ("grpo", "ctpo", "gspo"):
        ref = markov.exact_moments(two, preset, "reward", 0.3, along_gradient=False)
        for corr in (None, "decoupled_seq_is", "decoupled_token_icepop", "cumulative_sqrt_t", "decoupled_geo_rs"):
            m = markov.rollout_exact_moments(chain, preset, corr, "reward", 0.3, along_gradient=False)
            assert np.allclose(m.mean, ref.mean, atol=1e-13) and np.allclose(m.second_moment_diag,
                                                                             ref.second_moment_diag, atol=1e-13)
    target = markov.framework_target(chain, "grpo", baseline=0.3)
    assert np.allclose(target, markov.exact_moments(two, "grpo", "reward", 0.3).mean)


def test_instance_mismatch_levels():
    ch = markov.three_policy_instance(3, 4, 1, seed=0, kl_roll_old=1e-3, kl_old_pi=1e-2)
    mm = ch.mismatch()
    assert mm["kl_roll_old"] == pytest.approx(1e-3, rel=1e-6) and mm["kl_old_pi"] == pytest.approx(1e-2, rel=1e-6)
    st = markov.three_policy_instance(3, 4, 1, seed=0, kl_roll_old=1e-3, kl_old_pi=1e-2, roll_direction="stale")
    assert st.mismatch()["kl_roll_pi"] > mm["kl_old_pi"]  # a stale sampler is further from π than π_old
    chi = markov.three_policy_instance(3, 4, 1, seed=0, kl_roll_old=1e-3, kl_old_pi=0.0, measure="chi2")
    assert np.allclose(markov.model.chi2_rows(chi.old, chi.rollout), 1e-3)
    with pytest.raises(ValueError, match="roll_direction"):
        markov.three_policy_instance(kl_old_pi=0.0, roll_direction="stale")
    with pytest.raises(ValueError, match="kl_roll_old"):
        markov.three_policy_instance(kl_roll_old=-1.0)


def test_unsupported_pairs_raise_with_the_alternative():
    chain = _chain(*CHAINS[1])
    with pytest.raises(ValueError, match="shift the positions"):
        markov.rollout_exact_moments(chain, "ctpo", _CUSTOM["token_k3_rs"])
    norm = RolloutCorrection(name="tis_norm", rollout_is="token", rollout_is_threshold=2.0,
                             rollout_is_batch_normalize=True)
    assert markov.rollout_lab_method("grpo", norm) == "batch"
    with pytest.raises(ValueError, match="batch_size"):
        markov.rollout_exact_moments(chain, "grpo", norm)
    with pytest.raises(ValueError, match="batch-level"):
        markov.enumerate_moments(chain.mdp, "grpo", old_policy=chain.old, rollout_correction=norm)
    with pytest.raises(ValueError, match="rule 'opsm'"):
        markov.rollout_exact_moments(chain, "opsm", "decoupled_token_is")
    with pytest.raises(ValueError, match="old_policy"):
        markov.enumerate_moments(chain.mdp, "grpo", rollout_correction="decoupled_token_is")
    mc = markov.monte_carlo_moments(chain.mdp, "grpo", "reward", 0.3, n=256, batch_size=32, old_policy=chain.old,
                                    rollout_correction=norm)
    assert mc.method == "mc-batch(32)" and np.all(np.isfinite(mc.mean))


@pytest.mark.parametrize("preset,correction", [("ctpo", "token_k3_rs"), ("opsm", "decoupled_seq_is")])
def test_monte_carlo_within_5_se_of_enumeration(preset, correction):
    chain = _chain(*CHAINS[0])
    corr = _corr(correction)
    assert markov.rollout_lab_method(preset, corr) == "per_trajectory"
    en = markov.enumerate_moments(chain.mdp, preset, "reward", 0.3, old_policy=chain.old, rollout_correction=corr)
    mc = markov.monte_carlo_moments(chain.mdp, preset, "reward", 0.3, n=8_000, seed=2, old_policy=chain.old,
                                    rollout_correction=corr)
    ok = mc.mean_se > 0
    assert np.all(np.abs(mc.mean - en.mean)[ok] <= 5 * mc.mean_se[ok])
    assert np.all(np.abs(mc.mean - en.mean)[~ok] <= 1e-12)


def test_rollout_moments_dispatch():
    chain = _chain(*CHAINS[1])
    assert markov.rollout_moments(chain, "grpo", "decoupled_token_is").method == "dp"
    assert markov.rollout_moments(chain, "ctpo", _CUSTOM["token_k3_rs"]).method == "enumeration"
    assert markov.rollout_moments(chain, "ctpo", _CUSTOM["token_k3_rs"], method="mc", n_mc=512).method == "mc"
    assert set(ROLLOUT_CORRECTIONS) >= {"decoupled_geo_rs", "cumulative_sqrt_t", "trl_token_mask"}


def test_rollout_correction_table_small():
    from ctpo_lab.markov import study

    df = study.rollout_correction_table(("grpo", "ctpo"), ("none", "decoupled_seq_is", "decoupled_token_is"),
                                        regimes=(("bf16", 1e-3, "noise"),), horizon=3)
    assert len(df) == 6 and set(df["method"]) == {"dp"}
    seq = df[df["correction"] == "decoupled_seq_is"]
    assert (seq["correction_error"] < 1e-12).all()  # the threshold never binds: E_roll[ρ X] = E_old[X]
    none = df[df["correction"] == "none"].set_index("preset")["correction_error"]
    tok = df[df["correction"] == "decoupled_token_is"].set_index("preset")["correction_error"]
    assert (tok < none).all() and (none > 0).all()
    assert np.allclose(df[df["correction"] == "none"]["trace_cov_ratio"], 1.0)
