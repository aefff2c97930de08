"""Ratio families: property-based identities (hypothesis) and position semantics."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ctpo_lab import ratios
from ctpo_lab.losses import policy_loss

finite = st.floats(-3.0, 3.0, allow_nan=False, width=64)


@st.composite
def batches(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 12))
    ell = draw(arrays(np.float64, (B, T), elements=finite))
    mask = draw(arrays(np.bool_, (B, T)))
    return torch.from_numpy(ell), torch.from_numpy(mask)


@settings(max_examples=60, deadline=None)
@given(batches())
def test_cumulative_equals_token_at_first_valid_token(batch):
    ell, mask = batch
    t = ratios.positions(mask)
    tok = ratios.family_log_weight("token", ell, mask)
    cum = ratios.family_log_weight("cumulative", ell, mask)
    first = mask & (t == 1)
    assert torch.equal(tok[first], cum[first])


@settings(max_examples=60, deadline=None)
@given(batches())
def test_cumulative_at_last_valid_token_equals_sequence(batch):
    ell, mask = batch
    t = ratios.positions(mask)
    last = mask & (t == mask.sum(-1, keepdim=True))
    cum = ratios.family_log_weight("cumulative", ell, mask)
    seq = ratios.family_log_weight("sequence", ell, mask)
    torch.testing.assert_close(cum[last], seq[last], rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(batches())
def test_sequence_geomean_ratio_is_exp_mean_log_ratio(batch):
    ell, mask = batch
    g = ratios.family_log_weight("sequence_geomean", ell, mask)
    for i in range(ell.shape[0]):
        valid = ell[i][mask[i]].numpy()
        if valid.size:
            expected = math.exp(valid.mean())
            np.testing.assert_allclose(g[i][mask[i]].exp().numpy(), expected, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(batches(), st.floats(1.01, 3.0))
def test_truncated_families(batch, cap):
    ell, mask = batch
    tis = ratios.family_log_weight("token_tis", ell, mask, truncation=cap)
    tc = ratios.family_log_weight("truncated_cumulative", ell, mask, truncation=cap)
    ref_tis = np.minimum(np.exp(ell.numpy()), cap)
    np.testing.assert_allclose(tis.exp().numpy()[mask.numpy()], ref_tis[mask.numpy()], rtol=1e-12)
    for i in range(ell.shape[0]):
        r = np.minimum(np.exp(ell[i][mask[i]].numpy()), cap)
        np.testing.assert_allclose(tc[i][mask[i]].exp().numpy(), np.cumprod(r), rtol=1e-10)


@settings(max_examples=40, deadline=None)
@given(batches(), arrays(np.float64, (4,), elements=st.floats(-2, 2)))
def test_ctpo_with_p0_and_infinite_window_is_unclipped_cumulative(batch, adv):
    ell, mask = batch
    B = ell.shape[0]
    adv_t = torch.from_numpy(adv[:B])
    old = torch.full_like(ell, -1.5)
    lp = old + ell
    loss, _ = policy_loss(lp, old, adv_t, mask, preset="ctpo", clip_exponent=0.0, eps_low=1e6, eps_high=1e6,
                          dual_clip=None, max_log_weight=None)
    # independent: -(1/n) Σ_i Σ_t A_i Π_{k≤t} r_k over valid tokens
    total, n = 0.0, int(mask.sum())
    for i in range(B):
        r = np.exp(ell[i][mask[i]].numpy())
        total += -adv[i] * np.cumprod(r).sum()
    expected = total / max(n, 1)
    assert abs(loss.item() - expected) <= 1e-9 * max(1.0, abs(expected))


def test_positions_skip_masked_tokens():
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    t = ratios.positions(mask)
    assert t[mask].tolist() == [1, 2, 3, 1, 2]
    ell = torch.tensor([[5.0, 0.1, 0.2, 7.0, 0.3], [0.5, 9.0, 9.0, 9.0, -0.5]])
    L = ratios.cumulative_log_ratio(ell, mask)
    torch.testing.assert_close(L[mask], torch.tensor([0.1, 0.3, 0.6, 0.5, 0.0]))


def test_geomean_divides_by_valid_position():
    mask = torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)
    ell = torch.tensor([[0.3, 100.0, 0.6, -0.3]], dtype=torch.float64)
    x = ratios.family_log_weight("cumulative_geomean", ell, mask)
    torch.testing.assert_close(x[mask], torch.tensor([0.3, 0.9 / 2, 0.6 / 3], dtype=torch.float64))


def test_stop_gradient_weight_value_and_gradient():
    lp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[0.1, 0.4, 12.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    log_w = ratios.stop_gradient_log_weight(x, lp, mask, max_log_weight=10.0)
    torch.testing.assert_close(log_w.detach(), torch.tensor([[0.1, 0.4, 10.0]], dtype=torch.float64))
    log_w.exp().sum().backward()
    # ∇w_t = w_t ∇log π_t, zero where the cap is active
    torch.testing.assert_close(lp.grad, torch.tensor([[math.exp(0.1), math.exp(0.4), 0.0]], dtype=torch.float64))
