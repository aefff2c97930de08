"""The one-definition contract: the exact lab's estimator of a LossConfig is minus the autograd gradient of
``policy_loss`` on each trajectory, with respect to the tabular target logits.

Every trajectory of small chains is enumerated; for each one ``policy_loss`` (aggregation
``seq-mean-token-sum``, advantages = the signal) is differentiated with autograd with respect to its own copy of
the logits table θ (target π = softmax θ). The μ-weighted mean and diagonal second moment of −∇_θ loss must equal
the dynamic programme's (``markov.exact_moments``, exact atoms) to 1e-9, for every preset and for random
overrides covering both clip families, the dual clip on and off, p ∈ {0, 0.5, other}, caps, truncations and
CISPO's detached clip.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctpo_lab import markov
from ctpo_lab.losses import PRESETS, LossConfig, policy_loss, resolve_config
from ctpo_lab.markov.enumerate import tree_values

CHAINS = [(2, 5, 1, 0.2, 3), (3, 4, 1, 0.15, 7)]  # (V, T, k, kl, seed): 32 and 81 trajectories
SIGNALS = (("reward", 0.3), ("adv_pi", 0.0))


def _chain(V, T, k, kl, seed):
    return markov.random_instance(V, T, k, seed=seed, kl=kl, automaton="frac:0")


def autograd_moments(mdp, cfg: LossConfig, signal: str, baseline: float, path: str = "reference"
                     ) -> tuple[np.ndarray, np.ndarray]:
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
                          aggregation="seq-mean-token-sum", path=path)
    loss.backward()
    X = -(theta_rows.grad * n).reshape(n, -1).numpy()  # the loss is the mean over rows of each row's token sum
    return p_mu @ X, p_mu @ X**2


def _check(mdp, cfg, signal, baseline):
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
        trunc = float(rng.choice([0.8, 1.0, 1.3])) if ratio in ("truncated_cumulative", "token_tis") else None
        base = str(rng.choice(sorted(PRESETS)))
        out.append(resolve_config(base, name=f"random_{i}", ratio=ratio, clip=clip, clip_exponent=p, dual_clip=dual,
                                  max_log_weight=cap, truncation=trunc, **eps))
    return out


@pytest.mark.parametrize("chain", CHAINS, ids=[f"V{c[0]}T{c[1]}" for c in CHAINS])
@pytest.mark.parametrize("name", sorted(PRESETS))
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
