"""ctpo_lab.stats: the √t fit (calibration of the exponent test), drift, clip/ESS profiles, bootstrap CIs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctpo_lab import diagnostics, stats


def iid_walks(seed: int, n: int = 200, t: int = 256, sigma: float = 0.035, variable: bool = True):
    rng = np.random.default_rng(seed)
    ell = -(sigma**2) / 2 + sigma * rng.standard_normal((n, t))
    lengths = rng.integers(t // 2, t + 1, n) if variable else np.full(n, t)
    mask = np.arange(t)[None] < lengths[:, None]
    return np.cumsum(ell, 1), mask


def latent_walks(seed: int, n: int = 200, t: int = 256, sigma: float = 0.035):
    """A persistent latent mode: each sequence draws a regime with a different KL drift (docs/theory.md §5)."""
    rng = np.random.default_rng(seed)
    kappa = np.where(rng.random(n) < 0.5, 0.0, 0.02)
    ell = -kappa[:, None] + sigma * rng.standard_normal((n, t))
    return np.cumsum(ell, 1), np.ones((n, t), dtype=bool)


def test_exponent_ci_calibrated_on_iid_walks():
    hits = [stats.sqrt_t_fit(*iid_walks(s), n_boot=300, seed=s).contains(0.5) for s in range(40)]
    assert np.mean(hits) >= 0.9


def test_exponent_ci_excludes_half_under_latent_mode():
    fits = [stats.sqrt_t_fit(*latent_walks(s), n_boot=300, seed=s) for s in range(10)]
    assert all(not f.contains(0.5) for f in fits)
    assert all(f.exponent > 0.6 for f in fits)


def test_sigma_hat_recovers_sigma_and_matches_diagnostics_profile():
    L, m = iid_walks(0, n=400, variable=False)
    fit = stats.sqrt_t_fit(L, m, n_boot=200)
    assert fit.sigma_hat == pytest.approx(0.035, rel=0.05)
    assert fit.sigma_hat_ci[0] <= fit.sigma_hat <= fit.sigma_hat_ci[1]
    prof = diagnostics.position_profile(torch.from_numpy(L), torch.from_numpy(m), 50)
    assert stats.fixed_exponent_sigma(prof, min_count=30) == pytest.approx(fit.sigma_hat, rel=1e-10)
    assert np.isclose(fit.fixed_curve([4.0])[0], 2 * fit.sigma_hat)


def test_accepts_tensors_and_is_deterministic():
    L, m = iid_walks(1, n=100)
    a = stats.sqrt_t_fit(torch.from_numpy(L), torch.from_numpy(m), n_boot=100, seed=3)
    b = stats.sqrt_t_fit(L, m.astype(np.int64), n_boot=100, seed=3)
    assert a.exponent_ci == b.exponent_ci and a.sigma_hat == b.sigma_hat
    d = a.to_dict()
    assert isinstance(d["grid_t"], list) and len(d["exponent_ci"]) == 2


def test_centering_within_groups_removes_prompt_heterogeneity():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 4)
    offset = rng.normal(0, 0.02, 60)[groups]  # each prompt has its own KL drift
    L = np.cumsum(-offset[:, None] + 0.035 * rng.standard_normal((240, 256)), 1)
    m = np.ones_like(L, dtype=bool)
    pooled = stats.sqrt_t_fit(L, m, groups, n_boot=200)
    centred = stats.sqrt_t_fit(L, m, groups, center=True, n_boot=200)
    assert pooled.cluster == "group" and pooled.exponent > 0.7
    assert centred.contains(0.5)
    assert centred.sigma_hat == pytest.approx(0.035, rel=0.1)
    c = stats.center_within_groups(L, m, groups)
    assert np.allclose(c.reshape(60, 4, -1).sum(1), 0.0)


def test_sqrt_t_fit_bad_input():
    L, m = iid_walks(0, n=50)
    bad = L.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="cum_log_ratio"):
        stats.sqrt_t_fit(bad, m)
    bad2 = L.copy()
    bad2[~m] = np.nan  # NaN on masked-out tokens is ignored
    stats.sqrt_t_fit(bad2, m, n_boot=20)
    with pytest.raises(ValueError, match="mask"):
        stats.sqrt_t_fit(L, m[:, :10])
    with pytest.raises(ValueError, match="groups"):
        stats.sqrt_t_fit(L, m, center=True)
    with pytest.raises(ValueError, match="groups"):
        stats.sqrt_t_fit(L, m, np.arange(3))
    with pytest.raises(ValueError, match="alive"):
        stats.sqrt_t_fit(L, m, min_count=500)
    with pytest.raises(TypeError, match="cum_log_ratio"):
        stats.sqrt_t_fit("abc", m)
    with pytest.raises(ValueError, match="n_boot"):
        stats.sqrt_t_fit(L, m, n_boot=0)


def test_drift_profile_against_kl():
    rng = np.random.default_rng(0)
    kappa = 0.002
    ell = -kappa + 0.03 * rng.standard_normal((300, 200))
    L = np.cumsum(ell, 1)
    m = np.ones_like(L, dtype=bool)
    d = stats.drift_profile(L, m, np.full_like(L, kappa), bin_width=20)
    assert d.drift_per_token == pytest.approx(-kappa, rel=0.2)
    assert d.kl_per_token == pytest.approx(kappa)
    assert np.allclose(d.neg_cum_kl, -kappa * d.bin_center)
    assert d.mean_log_ratio == pytest.approx(-kappa, abs=5e-4)
    assert isinstance(d.to_dict()["mean"], list)


def test_clip_rate_profile_matches_the_authors_rule():
    rng = np.random.default_rng(1)
    n, t = 64, 120
    ell = 0.08 * rng.standard_normal((n, t))
    m = np.arange(t)[None] < rng.integers(40, t + 1, n)[:, None]
    adv = rng.choice([-1.0, 0.0, 1.0], n)
    L = np.cumsum(np.where(m, ell, 0), 1)
    pos = np.cumsum(m, 1)
    for window, lo, hi in (("fixed_window", math.log(0.5) + 0 * pos, math.log(5.0) + 0 * pos),
                           ("sqrt_t_window", -0.025 * np.sqrt(pos), 0.05 * np.sqrt(pos))):
        prof = stats.clip_rate_profile(ell, m, adv, window=window, bin_width=10)
        ref = ((adv[:, None] > 0) & (L > hi)) | ((adv[:, None] < 0) & (L < lo))
        assert int(prof.clipped.sum()) == int((ref & m).sum())
        outside = stats.clip_rate_profile(ell, m, None, window=window, bin_width=10)
        assert int(outside.clipped.sum()) == int((((L > hi) | (L < lo)) & m).sum())
    # presets work too (the ctpo preset adds its dual clip), and unknown names fail
    stats.clip_rate_profile(ell, m, adv, window="ctpo")
    with pytest.raises(ValueError, match="window"):
        stats.clip_rate_profile(ell, m, adv, window="nope")
    with pytest.raises(ValueError, match="advantages"):
        stats.clip_rate_profile(ell, m, adv[:3])


def test_ess_profile():
    m = np.ones((10, 30), dtype=bool)
    c, e = stats.ess_profile(np.zeros((10, 30)), m, bin_width=10)
    assert np.allclose(e, 1.0) and c.tolist() == [5.5, 15.5, 25.5]
    rng = np.random.default_rng(0)
    _, e2 = stats.ess_profile(np.cumsum(rng.standard_normal((10, 30)), 1), m, bin_width=10)
    assert e2[0] > e2[-1]


def test_bootstrap_ci_mean_and_iqm():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 40)
    ci = stats.bootstrap_ci(x, seed=1)
    assert ci.low < ci.estimate < ci.high and ci.low < 1.0 < ci.high
    assert ci == stats.bootstrap_ci(x, seed=1)
    assert ci.estimate == pytest.approx(x.mean())
    from scipy.stats import trim_mean

    assert stats.iqm(x) == pytest.approx(trim_mean(x, 0.25))
    scores = rng.normal(0, 1, (5, 3))  # 5 seeds × 3 tasks
    q = stats.bootstrap_ci(scores, statistic="iqm", n_boot=500)
    assert q.method == "iqm/stratified" and q.low <= q.estimate <= q.high
    med = stats.bootstrap_ci(x, statistic=np.median, n_boot=200)
    assert med.low <= med.estimate <= med.high
    with pytest.raises(ValueError, match="values"):
        stats.bootstrap_ci([1.0, math.inf])
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_ci(x, confidence=1.5)
    with pytest.raises(ValueError, match="statistic"):
        stats.bootstrap_ci(x, statistic="mode")


def test_curve_bands():
    rng = np.random.default_rng(0)
    curves = rng.normal(0, 1, (6, 20)).cumsum(1)
    curves[0, -1] = np.nan  # a run without the last point
    b = stats.curve_bands(curves, x=np.arange(20), n_boot=300)
    assert b.estimate.shape == (20,) and np.all(b.low <= b.high)
    assert np.isfinite(b.estimate).all()
    b3 = stats.curve_bands(rng.normal(0, 1, (5, 3, 10)), statistic="iqm", n_boot=100)
    assert b3.method == "iqm/stratified" and b3.estimate.shape == (10,)
    assert isinstance(b.to_dict()["x"], list)
    with pytest.raises(ValueError, match="x"):
        stats.curve_bands(curves, x=np.arange(3))
    with pytest.raises(ValueError, match="curves"):
        stats.curve_bands(np.zeros(5))


def test_binned_profile_and_table():
    L, m = iid_walks(0, n=50, t=100)
    prof = stats.binned_profile(L, m, bin_width=25)
    tab = stats.profile_table(prof, min_count=2000)
    assert np.isnan(tab.std[-1]) or tab.count[-1] >= 2000
    assert tab.to_dict()["bin_width"] == 25
    with pytest.raises(TypeError, match="profile"):
        stats.profile_table("x")
