"""The one-definition contract: the exact lab's estimator of a LossConfig is minus the autograd gradient of
``policy_loss`` on each trajectory, with respect to the tabular target logits.

Every trajectory of small chains is enumerated; for each one ``policy_loss`` (aggregation
``seq-mean-token-sum``, advantages = the signal) is differentiated with autograd with respect to its own copy of
the logits table θ (target π = softmax θ). The μ-weighted mean and diagonal second moment of −∇_θ loss must equal
the dynamic programme's (``markov.exact_moments``, exact atoms) to 1e-9, for every preset and for random
overrides covering both clip families, the dual clip on and off, p ∈ {0, 0.5, other}, caps, truncations and
CISPO's detached clip, and the zoo rules the DP represents (GPPO, SAPO, GPG, the IcePop band).

The zoo presets the DP does not represent: ``check_dp_support`` raises; per-trajectory ones are measured by
enumeration (equal to the autograd moments to 1e-9) and Monte Carlo (within 5 standard errors of the
enumeration); batch-level ones are Monte Carlo on batches, whose per-row coefficients are the autograd gradient
of ``policy_loss`` on each batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctpo_lab import markov
from ctpo_lab.losses import PRESETS, ZOO_PRESETS, LossConfig, policy_loss, resolve_config
from ctpo_lab.markov.enumerate import tree_values
from ctpo_lab.markov.estimator import loss_token_coefficients

CHAINS = [(2, 5, 1, 0.2, 3), (3, 4, 1, 0.15, 7)]  # (V, T, k, kl, seed): 32 and 81 trajectories
SIGNALS = (("reward", 0.3), ("adv_pi", 0.0))


def _chain(V, T, k, kl, seed):
    return markov.random_instance(V, T, k, seed=seed, kl=kl, automaton="frac:0")


def autograd_moments(mdp, cfg: LossConfig, signal: str, baseline: float, path: str = "reference",
                     aggregation: str = "seq-mean-token-sum") -> tuple[np.ndarray, np.ndarray]:
    """E_μ[X] and E_μ[X²] of X(y) = −∇_θ policy_loss(y) over all trajectories y (float64). ``path="reference"``
    differentiates the loss with autograd end to end; ``"lean"`` (the default path of ``policy_loss``) uses the
    loss's fused backward for the per-token step and autograd for the softmax."""
    tr = markov.enumerate_trajectories(mdp)
    keep = tr["p_mu"] > 0
    seqs, ctx, p_mu = tr["seqs"][keep], tr["ctx"][keep], tr["p_mu"][keep]
    n, T = seqs.shape
    if signal == "reward":
        adv = np.repeat((tr["reward"][keep] - baseline)[:, None], T, axis=1)
    else:
        q, v = tree_values(mdp, mdp.target, tr["reward"])
        adv = (q - v)[keep]
    theta = torch.tensor(np.log(mdp.target), dtype=torch.float64)
    theta_rows = theta.expand(n, *theta.shape).clone().requires_grad_()  # one copy of θ per trajectory
    log_pi = torch.log_softmax(theta_rows, dim=-1)
    rows = torch.arange(n)[:, None]
    log_prob = log_pi[rows, torch.as_tensor(ctx), torch.as_tensor(seqs)]
    old = torch.as_tensor(np.log(mdp.behaviour[ctx, seqs]))
    loss, _ = policy_loss(log_prob, old, torch.as_tensor(adv), torch.ones(n, T, dtype=torch.bool), preset=cfg,
                          aggregation=aggregation, path=path)
    loss.backward()
    X = -(theta_rows.grad * n).reshape(n, -1).numpy()  # the loss is the mean over rows of each row's token sum
    return p_mu @ X, p_mu @ X**2


def _float32_taus(cfg: LossConfig) -> LossConfig:
    """SAPO's τ rounded to float32: ``surrogates._sapo`` builds τ with ``torch.where(adv > 0, τ_pos, τ_neg)``, a
    float32 tensor, so τ_neg = 1.05 reaches the float64 loss as 1.0499999523 (a 2e-8 relative difference from
    the DP's τ); with float32-exact values both sides agree to rounding, before and after that is fixed."""
    if cfg.clip != "sapo":
        return cfg
    return resolve_config(cfg, tau_pos=float(np.float32(cfg.tau_pos)), tau_neg=float(np.float32(cfg.tau_neg)))


def _check(mdp, cfg, signal, baseline):
    cfg = _float32_taus(cfg)
    dp = markov.exact_moments(mdp, cfg, signal, baseline=baseline, along_gradient=False)
    for path in ("reference", "lean"):
        mean, second = autograd_moments(mdp, cfg, signal, baseline, path)
        scale = max(np.abs(mean).max(), 1e-12)
        assert np.abs(dp.mean - mean).max() <= 1e-9 * scale, (cfg, signal, path)
        assert np.abs(dp.second_moment_diag - second).max() <= 1e-9 * max(second.max(), 1e-12), (cfg, signal, path)
    return mean


def random_configs(n: int, seed: int = 0) -> list[LossConfig]:
    """Random overrides of random presets over every ratio family and clip rule."""
    rng = np.random.default_rng(seed)
    families = ("token", "sequence", "sequence_geomean", "cumulative", "cumulative_geomean", "truncated_cumulative",
                "token_tis")
    out = []
    for i in range(n):
        clip = str(rng.choice(["ppo", "log_window", "detached_clip", "none"]))
        ratio = str(rng.choice(families))
        p = float(rng.choice([0.0, 0.5, -0.5, 0.3]))
        if ratio in ("sequence", "sequence_geomean") and clip == "log_window":
            p = 0.0  # a position-dependent window on a sequence ratio: the DP refuses it (tested separately)
        if clip == "ppo":
            eps = dict(eps_low=float(rng.uniform(0.02, 0.3)), eps_high=float(rng.uniform(0.02, 0.3)))
            dual = float(rng.choice([1.1, 1.5, 3.0])) if rng.random() < 0.6 else None
        elif clip == "log_window":
            eps = dict(eps_low=float(rng.uniform(0.02, 0.3)), eps_high=float(rng.uniform(0.02, 0.3)))
            dual = float(rng.uniform(0.02, 0.3)) if rng.random() < 0.6 else None
        elif clip == "detached_clip":
            eps = dict(eps_low=float(rng.uniform(0.05, 1.0)), eps_high=float(rng.uniform(0.05, 0.5)))
            dual = None
        else:
            eps = {}
            dual = float(rng.choice([1.1, 1.5])) if rng.random() < 0.5 else None
        cap = float(rng.choice([0.2, 0.5])) if rng.random() < 0.3 else None
        if clip == "detached_clip":  # the lean path zeroes CISPO's gradient above the cap, the reference keeps it
            cap = None
        trunc = float(rng.choice([0.8, 1.0, 1.3])) if ratio in ("truncated_cumulative", "token_tis") else None
        base = str(rng.choice(DP_PRESETS))
        out.append(resolve_config(base, name=f"random_{i}", ratio=ratio, clip=clip, clip_exponent=p, dual_clip=dual,
                                  max_log_weight=cap, truncation=trunc, mask_rule="none", **eps))
    return out


def random_zoo_configs(n: int, seed: int = 1) -> list[LossConfig]:
    """Random overrides of the zoo rules the DP represents: GPPO (token ratios, caps), SAPO (τ), GPG, and the
    IcePop band on every ratio family and clip rule."""
    rng = np.random.default_rng(seed)
    families = ("token", "sequence", "sequence_geomean", "cumulative", "cumulative_geomean", "truncated_cumulative",
                "token_tis")
    out = []
    for i in range(n):
        kind = ("gppo", "sapo", "reinforce", "band")[i % 4]
        band = dict(mask_rule="ratio_band", mask_low=float(rng.uniform(0.6, 0.95)),
                    mask_high=float(rng.uniform(1.05, 1.6)))
        if kind == "gppo":
            ratio = str(rng.choice(["token", "token_tis"]))
            cfg = resolve_config("gppo", ratio=ratio, eps_low=float(rng.uniform(0.02, 0.3)),
                                 eps_high=float(rng.uniform(0.02, 0.3)),
                                 max_log_weight=float(rng.choice([0.2, 0.5])) if rng.random() < 0.3 else None,
                                 truncation=float(rng.choice([0.8, 1.3])) if ratio == "token_tis" else None,
                                 **(band if rng.random() < 0.3 else {}))
        elif kind == "sapo":
            cfg = resolve_config("sapo", tau_pos=float(rng.choice([0.5, 1.0, 4.0])),
                                 tau_neg=float(rng.choice([0.25, 2.0, 8.0])),
                                 log_ratio_clamp=float(rng.choice([0.2, 20.0])), **(band if rng.random() < 0.3 else {}))
        elif kind == "reinforce":
            cfg = resolve_config("gpg", **(band if rng.random() < 0.5 else {}))
        else:
            ratio = str(rng.choice(families))
            clip = str(rng.choice(["ppo", "none", "detached_clip", "log_window"]))
            cfg = resolve_config("icepop", ratio=ratio, clip=clip, dual_clip=None,
                                 truncation=1.0 if ratio in ("truncated_cumulative", "token_tis") else None, **band)
        out.append(resolve_config(cfg, name=f"zoo_{kind}_{i}"))
    return out


#: presets by how the exact lab measures them (with the outcome signal)
DP_PRESETS = sorted(n for n in PRESETS if markov.lab_method(n) == "dp")
PER_TRAJECTORY_PRESETS = sorted(n for n in PRESETS if markov.lab_method(n) == "per_trajectory")
BATCH_PRESETS = sorted(n for n in PRESETS if markov.lab_method(n) == "batch")


def test_the_zoo_is_classified():
    """The zoo presets the DP represents, and the ones it refuses (the README's "exact or MC" column)."""
    assert {"dr_grpo", "bnpo", "luspo", "icepop", "gpg", "gppo", "sapo", "grpo", "dapo", "gspo", "cispo"} <= set(
        DP_PRESETS)
    assert set(PER_TRAJECTORY_PRESETS) == {"gmpo", "topr", "vespo", "dppo_tv", "dppo_kl", "opsm", "trm", "cppo"}
    assert set(BATCH_PRESETS) == {"clip_cov", "kl_cov", "m2po"}
    assert set(ZOO_PRESETS) <= set(DP_PRESETS) | set(PER_TRAJECTORY_PRESETS) | set(BATCH_PRESETS)
    assert markov.lab_method("gspo", "adv_pi") == "per_trajectory"  # a sequence-level sign mask, per-token signal
    assert markov.lab_method("gppo", ratio="cumulative") == "per_trajectory"  # sign weight on a prefix ratio


@pytest.mark.parametrize("chain", CHAINS, ids=[f"V{c[0]}T{c[1]}" for c in CHAINS])
@pytest.mark.parametrize("name", DP_PRESETS)
def test_every_preset_is_the_negative_loss_gradient(chain, name):
    mdp = _chain(*chain)
    est = markov.chain_estimator(name)
    for signal, b in SIGNALS:
        if est.level == "sequence" and est.sign_dependent and signal != "reward":
            with pytest.raises(ValueError, match="monte_carlo_moments"):  # sequence-level sign mask, per-token signal
                markov.exact_moments(mdp, name, signal, baseline=b)
            continue
        _check(mdp, PRESETS[name], signal, b)


@pytest.mark.parametrize("cfg", random_configs(40), ids=lambda c: c.name)
def test_random_overrides_are_the_negative_loss_gradient(cfg):
    mdp = _chain(*CHAINS[0])
    est = markov.chain_estimator(cfg)
    for signal, b in SIGNALS:
        if est.level == "sequence" and est.sign_dependent and signal != "reward":
            with pytest.raises(ValueError, match="monte_carlo_moments"):
                markov.exact_moments(mdp, cfg, signal, baseline=b)
            continue
        _check(mdp, cfg, signal, b)


@pytest.mark.parametrize("cfg", random_zoo_configs(16), ids=lambda c: c.name)
def test_zoo_rules_are_the_negative_loss_gradient(cfg):
    mdp = _chain(*CHAINS[1])
    est = markov.chain_estimator(cfg)
    assert est.method() == "dp", cfg
    for signal, b in SIGNALS:
        if est.method(signal) != "dp":
            with pytest.raises(ValueError, match="monte_carlo_moments"):
                markov.exact_moments(mdp, cfg, signal, baseline=b)
            continue
        _check(mdp, cfg, signal, b)


@pytest.mark.parametrize("name", PER_TRAJECTORY_PRESETS)
def test_per_trajectory_presets_are_enumerated(name):
    """The DP refuses them (pointing to Monte Carlo / enumeration); enumeration = autograd through the loss."""
    mdp = _chain(*CHAINS[1])
    est = markov.chain_estimator(name)
    with pytest.raises(ValueError, match="monte_carlo_moments.*enumerate_moments"):
        markov.check_dp_support(est, "reward")
    with pytest.raises(ValueError, match="monte_carlo_moments"):
        markov.exact_moments(mdp, name, "reward", baseline=0.3)
    for signal, b in SIGNALS:
        e = markov.enumerate_moments(mdp, name, signal, baseline=b)
        # each row's own token sum / N (a trust-region mask removes rows from seq-mean's denominator)
        mean, second = autograd_moments(mdp, PRESETS[name], signal, b, aggregation="all-seq-mean-token-sum")
        assert np.abs(e.mean - mean).max() <= 1e-9 * max(np.abs(mean).max(), 1e-12), (name, signal)
        assert np.abs(e.second_moment_diag - second).max() <= 1e-9 * max(second.max(), 1e-12), (name, signal)


@pytest.mark.parametrize("name", ["gmpo", "topr", "vespo", "dppo_kl", "opsm", "cppo", "sapo"])
def test_monte_carlo_agrees_with_enumeration(name):
    """Monte Carlo (the loss's coefficients on sampled trajectories) within 5 standard errors of the exact
    enumeration on every coordinate (a 5σ Bonferroni bound over ≤ 18 coordinates: a false failure < 1e-5)."""
    mdp = _chain(*CHAINS[1])
    e = markov.enumerate_moments(mdp, name, "reward", baseline=0.3)
    mc = markov.monte_carlo_moments(mdp, name, "reward", baseline=0.3, n=8_000, seed=3)
    assert mc.batch_size is None and mc.method == "mc"
    ok = mc.mean_se > 0
    assert ok.any()
    assert (np.abs(mc.mean - e.mean)[ok] <= 5 * mc.mean_se[ok]).all(), name
    assert np.array_equal(mc.mean[~ok], e.mean[~ok]) or np.abs(e.mean[~ok]).max() < 1e-12


@pytest.mark.parametrize("name", BATCH_PRESETS)
def test_batch_presets_are_monte_carlo_on_batches(name):
    """Batch-level presets: the DP and enumeration refuse them (pointing to batch_size); the per-row
    coefficients are −B·∂ policy_loss(batch)/∂log π on each batch of B trajectories; MC is reproducible."""
    mdp = _chain(*CHAINS[1])
    est = markov.chain_estimator(name)
    with pytest.raises(ValueError, match="batch_size"):
        markov.check_dp_support(est, "reward")
    with pytest.raises(ValueError, match="batch_size"):
        markov.enumerate_moments(mdp, name, "reward", baseline=0.3)
    B = 16
    tr = markov.sample_trajectories(mdp, 2 * B, seed=4)
    adv = np.repeat((tr["reward"] - 0.3)[:, None], mdp.horizon, axis=1)
    with pytest.raises(ValueError, match="batch_size"):
        loss_token_coefficients(tr["ell"], adv, est, log_prob=tr["log_pi"], old_log_prob=tr["log_mu"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        coef = loss_token_coefficients(tr["ell"], adv, est, log_prob=tr["log_pi"], old_log_prob=tr["log_mu"],
                                       batch_size=B)
        torch.manual_seed(0)
        for a in (0, B):
            lp = torch.tensor(tr["log_pi"][a:a + B], requires_grad=True)
            loss, _ = policy_loss(lp, torch.tensor(tr["log_mu"][a:a + B]), torch.tensor(adv[a:a + B]),
                                  torch.ones(B, mdp.horizon, dtype=torch.bool), preset=name,
                                  aggregation="all-seq-mean-token-sum")
            (g,) = torch.autograd.grad(loss * B, lp)
            np.testing.assert_allclose(coef[a:a + B], -g.numpy(), rtol=1e-12, atol=1e-14)
    one = markov.monte_carlo_moments(mdp, name, "reward", baseline=0.3, n=1_000, seed=5, batch_size=B)
    two = markov.monte_carlo_moments(mdp, name, "reward", baseline=0.3, n=1_000, seed=5, batch_size=B)
    assert one.n == 1_008 and one.batch_size == B and one.method == f"mc-batch({B})"
    assert np.array_equal(one.mean, two.mean) and np.array_equal(one.second_moment_diag, two.second_moment_diag)
    assert np.isfinite(one.mean_se).all() and (one.mean_se > 0).any()


def test_batch_statistic_is_honest():
    """M2PO's batch budget bites with a training batch and not on a single trajectory's worth of tokens
    (batches of 2 and of 64 trajectories give different estimators only if the statistic is per batch); with a
    budget that never binds it is the unclipped token estimator."""
    mdp = _chain(*CHAINS[1])
    loose = markov.monte_carlo_moments(mdp, "m2po", "reward", baseline=0.3, n=512, seed=6, mask_threshold=1e9)
    bare = markov.monte_carlo_moments(mdp, "unclipped_token", "reward", baseline=0.3, n=512, seed=6)
    np.testing.assert_allclose(loose.mean, bare.mean, rtol=1e-12, atol=1e-15)
    small = markov.monte_carlo_moments(mdp, "m2po", "reward", baseline=0.3, n=512, seed=6, batch_size=2)
    big = markov.monte_carlo_moments(mdp, "m2po", "reward", baseline=0.3, n=512, seed=6, batch_size=64)
    assert np.abs(small.mean - big.mean).max() > 1e-3 * np.abs(bare.mean).max()


def test_the_masks_bite():
    """The comparison is not vacuous: clipped presets differ from their bare weights on these chains."""
    mdp = _chain(*CHAINS[0])
    pairs = (("grpo", "unclipped_token"), ("ctpo", "unclipped_cumulative"), ("ctpo_fixed", "unclipped_cumulative"),
             ("gspo", "unclipped_sequence_geomean"), ("seq_is", "unclipped_sequence"), ("tis", "unclipped_token"),
             ("cumulative_tis", "unclipped_cumulative"), ("ctpo_geomean", "unclipped_cumulative_geomean"))
    for clipped, bare in pairs:
        a, _ = autograd_moments(mdp, PRESETS[clipped], "reward", 0.3)
        b, _ = autograd_moments(mdp, PRESETS[bare], "reward", 0.3)
        assert np.abs(a - b).max() > 1e-3 * np.abs(b).max(), (clipped, bare)
    for clipped, bare in (("gppo", "unclipped_token"), ("sapo", "unclipped_token"), ("gpg", "unclipped_token"),
                          (resolve_config("icepop", mask_low=0.9, mask_high=1.1), "unclipped_token")):
        a, _ = autograd_moments(mdp, PRESETS[clipped] if isinstance(clipped, str) else clipped, "reward", 0.3)
        b, _ = autograd_moments(mdp, PRESETS[bare], "reward", 0.3)
        assert np.abs(a - b).max() > 1e-3 * np.abs(b).max(), (clipped, bare)
    dual_on = resolve_config("ctpo", eps_low=0.2, eps_high=0.3, dual_clip=0.05)
    dual_off = resolve_config(dual_on, dual_clip=None)
    a, _ = autograd_moments(mdp, dual_on, "adv_pi", 0.0)
    b, _ = autograd_moments(mdp, dual_off, "adv_pi", 0.0)
    assert np.abs(a - b).max() > 1e-3 * np.abs(b).max()


def test_preset_name_and_config_give_identical_numbers():
    mdp = _chain(*CHAINS[1])
    for name in ("ctpo", "gspo", "grpo", "unclipped_sequence"):
        by_name = markov.exact_moments(mdp, name, "reward", baseline=0.3)
        by_config = markov.exact_moments(mdp, PRESETS[name], "reward", baseline=0.3)
        assert np.array_equal(by_name.mean, by_config.mean)
        assert np.array_equal(by_name.second_moment_diag, by_config.second_moment_diag)
        assert by_name.var_along_grad == by_config.var_along_grad
    over = markov.exact_moments(mdp, "ctpo", "reward", baseline=0.3, clip_exponent=0.0, name="ctpo_fixed")
    fixed = markov.exact_moments(mdp, "ctpo_fixed", "reward", baseline=0.3)
    assert np.array_equal(over.mean, fixed.mean)


def test_unsupported_configurations_point_to_monte_carlo():
    mdp = _chain(*CHAINS[0])
    seq_window = resolve_config("ctpo", name="sequence_sqrt_t", ratio="sequence")
    with pytest.raises(ValueError, match="monte_carlo_moments"):
        markov.exact_moments(mdp, seq_window, "reward", baseline=0.3)
    with pytest.raises(ValueError, match="max_atoms.*monte_carlo_moments"):
        markov.exact_moments(markov.random_instance(3, 9, 1, seed=0, kl=0.2), "ctpo", "reward", max_atoms=50)
    # Monte Carlo accepts it and agrees with the loss-gradient ground truth within its CI
    mean, _ = autograd_moments(mdp, seq_window, "reward", 0.3)
    mc = markov.monte_carlo_moments(mdp, seq_window, "reward", baseline=0.3, n=60_000, seed=2)
    ok = mc.mean_se > 0
    z = np.abs(mc.mean - mean)[ok] / mc.mean_se[ok]
    assert z.max() < 4.5  # Bonferroni over ≤ 8 coordinates at α ≈ 5e-5
