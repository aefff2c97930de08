"""Diagnostics checked against direct numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctpo_lab.diagnostics import loss_diagnostics, masked_quantiles, normalized_ess, position_profile
from ctpo_lab.losses import compute_policy_loss, policy_loss


def test_masked_quantiles_match_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 33, generator=g, dtype=torch.float64)
    mask = torch.rand(7, 33, generator=g) > 0.4
    q = (0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
    np.testing.assert_allclose(masked_quantiles(x, mask, q).numpy(), np.quantile(x[mask].numpy(), q), rtol=1e-12)
    one = torch.zeros_like(mask)
    one[2, 5] = True
    np.testing.assert_allclose(masked_quantiles(x, one, q).numpy(), np.full(6, x[2, 5].item()))
    assert torch.isnan(masked_quantiles(x, torch.zeros_like(mask), q)).all()


def test_normalized_ess_matches_direct_formula():
    g = torch.Generator().manual_seed(1)
    lw = torch.randn(50, generator=g, dtype=torch.float64)
    mask = torch.rand(50, generator=g) > 0.3
    w = lw[mask].exp().numpy()
    assert normalized_ess(lw, mask).item() == pytest.approx(w.sum() ** 2 / (len(w) * (w**2).sum()), rel=1e-12)
    # log space: no overflow for huge log-weights
    assert normalized_ess(torch.tensor([1000.0, 1000.0]), torch.tensor([True, True])).item() == pytest.approx(1.0)


def test_position_profile_matches_numpy_binning():
    g = torch.Generator().manual_seed(2)
    L = torch.randn(6, 23, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 23, generator=g) > 0.3
    clipped = torch.rand(6, 23, generator=g) > 0.7
    prof = position_profile(L, mask, bin_width=5, clipped=clipped)
    t = mask.long().cumsum(-1)
    for b in range(prof.count.numel()):
        sel = mask & (t >= b * 5 + 1) & (t <= (b + 1) * 5)
        vals = L[sel].numpy()
        assert prof.count[b].item() == len(vals)
        if len(vals):
            assert prof.mean[b].item() == pytest.approx(vals.mean(), abs=1e-12)
            assert prof.std[b].item() == pytest.approx(vals.std(), abs=1e-10)
            assert prof.clip_rate[b].item() == pytest.approx((clipped & sel).sum().item() / len(vals))
        else:
            assert math.isnan(prof.std[b].item())
    # profiles add across batches
    both = prof + position_profile(L[:2], mask[:2], bin_width=5, clipped=clipped[:2])
    assert both.count.sum().item() == mask.sum().item() + mask[:2].sum().item()
    with pytest.raises(ValueError, match="bin_width"):
        position_profile(L, mask, bin_width=0)


def test_loss_metrics_match_direct_computation():
    g = torch.Generator().manual_seed(3)
    B, T = 8, 40
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    lp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.05
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.2
    _, m = policy_loss(lp, old, adv, mask, preset="ctpo")
    ell = (lp - old).numpy()
    mk = mask.numpy()
    assert m["actor/ppo_kl"] == pytest.approx(-ell[mk].mean(), rel=1e-12)
    L = np.where(mk, ell, 0).cumsum(-1)
    t = mk.cumsum(-1)
    a = np.broadcast_to(adv.numpy()[:, None], (B, T))
    upper, lower = 0.05 * np.sqrt(t), -0.025 * np.sqrt(t)
    high = mk & (a > 0) & (L > upper)
    low = mk & (a < 0) & (L < lower)
    dual = mk & (a < 0) & (L > 0.05 * np.sqrt(t))  # dual bound e^{ε_c s_t} with ε_c = ε_high
    n = mk.sum()
    assert m["pg_update/clip/high/rate"] == pytest.approx(high.sum() / n)
    assert m["pg_update/clip/low/rate"] == pytest.approx(low.sum() / n)
    assert m["pg_update/clip/dual/rate"] == pytest.approx(dual.sum() / n)
    assert m["pg_update/clip/total/rate"] == pytest.approx((high | low | dual).sum() / n)
    assert m["clip_ratio/region_mean"] == pytest.approx((high | low).sum() / n)
    w = np.exp(L[mk])
    assert m["pg_update/is_ratio/mean"] == pytest.approx(w.mean(), rel=1e-12)
    assert m["pg_update/is_ratio/p90"] == pytest.approx(np.quantile(w, 0.9), rel=1e-12)
    assert m["pg_update/is_ratio/max"] == pytest.approx(w.max(), rel=1e-12)
    assert (high.sum() + low.sum()) > 0  # the batch does exercise the window


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cap", [None, 0.05])
@pytest.mark.parametrize("selected", [True, False])
def test_weight_statistics_match_numpy_on_both_paths(monkeypatch, dtype, cap, selected):
    """Every statistic of X_t and e^{X_t} against numpy, from the CPU's one-selection path and from the masked
    [B, T] path (the one accelerators take), with and without the log-weight cap."""
    from ctpo_lab import diagnostics

    if not selected:
        monkeypatch.setattr(diagnostics, "_weight_statistics_of_selected", lambda *a, **k: None)
    g = torch.Generator().manual_seed(4)
    B, T = 6, 50
    lw = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    log_ratio = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.02).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[4] = False  # a row without a token
    none = torch.zeros_like(mask)
    m = loss_diagnostics(log_ratio=log_ratio, log_weight_value=lw, mask=mask, clipped_high=none, clipped_low=none,
                         clipped_dual=none, clipped_term_active=none, max_log_weight=cap)
    x = lw.double().numpy()[mask.numpy()]
    c = x if cap is None else np.minimum(x, cap)
    w = np.exp(c)
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    expected = {
        "pg_update/is_ratio/mean": w.mean(), "pg_update/is_ratio/min": w.min(), "pg_update/is_ratio/max": w.max(),
        "pg_update/log_weight/mean": x.mean(), "pg_update/log_weight/min": x.min(),
        "pg_update/log_weight/max": x.max(), "pg_update/ess/token": w.sum() ** 2 / (len(w) * (w**2).sum()),
        "pg_update/num_tokens": len(x),
    }
    for q in (0.25, 0.5, 0.75, 0.9, 0.95, 0.99):
        expected[f"pg_update/is_ratio/p{round(q * 100)}"] = np.quantile(w, q)
    seq = np.exp(np.where(mask.numpy(), log_ratio.double().numpy(), 0).sum(-1)[mask.numpy().any(-1)])
    expected["pg_update/ess/sequence"] = seq.sum() ** 2 / (len(seq) * (seq**2).sum())
    for key, value in expected.items():
        assert m[key].item() == pytest.approx(value, rel=rel, abs=1e-7 if dtype == torch.float32 else 1e-14), key
    top, p99, p25 = (m[f"pg_update/is_ratio/{k}"].item() for k in ("max", "p99", "p25"))
    assert top >= p99 >= p25


def test_compute_policy_loss_exposes_intermediates():
    lp = torch.zeros(2, 3, dtype=torch.float64)
    out = compute_policy_loss(lp, lp - 0.1, torch.ones(2, dtype=torch.float64), torch.ones(2, 3), preset="ctpo")
    torch.testing.assert_close(out.log_weight_value, torch.tensor([[0.1, 0.2, 0.3]] * 2, dtype=torch.float64))
    assert out.position.tolist() == [[1, 2, 3]] * 2
    assert out.num_nonfinite.item() == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_log_weight_gives_the_masked_path_values(monkeypatch, bad):
    """One non-finite X_t among valid tokens: the CPU's default path and the masked path (whose saturation rules
    define these values) give the same metrics."""
    from ctpo_lab import diagnostics

    g = torch.Generator().manual_seed(6)
    lw = torch.randn(4, 30, generator=g) * 0.1
    lw[2, 7] = bad
    mask = torch.rand(4, 30, generator=g) > 0.2
    mask[2, 7] = True
    none = torch.zeros_like(mask)
    kw = dict(log_ratio=torch.zeros_like(lw), log_weight_value=lw, mask=mask, clipped_high=none, clipped_low=none,
              clipped_dual=none, clipped_term_active=none, max_log_weight=None)
    default = {k: v.item() for k, v in loss_diagnostics(**kw).items()}
    monkeypatch.setattr(diagnostics, "_weight_statistics_of_selected", lambda *a, **k: None)
    masked = {k: v.item() for k, v in loss_diagnostics(**kw).items()}
    assert default == pytest.approx(masked, nan_ok=True)
    if bad == math.inf:
        assert default["pg_update/log_weight/max"] == math.inf
