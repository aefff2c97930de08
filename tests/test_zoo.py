"""The estimator zoo: every preset's value and gradient against a hand-written per-token formula (numpy float64,
loops over rows and tokens, written from the formulas in ``losses.PRESET_SOURCES`` and the rule docstrings, not
from the vectorised code), and the masks against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctpo_lab import masks
from ctpo_lab.losses import PRESET_SOURCES, PRESETS, ZOO_PRESETS, compute_policy_loss, policy_loss


def _batch(seed: int, B: int = 5, T: int = 8, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    old = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 2.0 + 0.05)
    lp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * scale).clamp(max=-1e-3)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[1, 0] = False  # a hole at the start of a row
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[2] = 0.0
    return lp, old, adv, mask


def _agg(per_tok: np.ndarray, grad_tok: np.ndarray, mask: np.ndarray, mode: str):
    """Scalar loss and d loss / d lp from the per-token loss and d loss_t / d lp_t (tokens independent)."""
    n_i = mask.sum(1)
    B, T = mask.shape
    rows = max((n_i > 0).sum(), 1)
    if mode == "token-mean":
        w = np.full((B, 1), 1.0 / max(mask.sum(), 1))
    elif mode == "seq-mean-token-mean":
        w = (1.0 / np.maximum(n_i, 1) / rows)[:, None]
    elif mode == "seq-mean-token-sum-norm":
        w = np.full((B, 1), 1.0 / rows / T)
    elif mode == "all-seq-mean-token-sum":
        w = np.full((B, 1), 1.0 / B)
    else:
        raise AssertionError(mode)
    w = np.broadcast_to(w, (B, T)) * mask
    return float((per_tok * w).sum()), grad_tok * w


def _reference(name: str, lp: np.ndarray, old: np.ndarray, adv: np.ndarray, mask: np.ndarray):
    """(loss, gradient) of a zoo preset written token by token."""
    cfg = PRESETS[name]
    B, T = lp.shape
    A = np.repeat(adv[:, None], T, 1)
    ell_raw = lp - old
    clamp = cfg.log_ratio_clamp
    ell = np.clip(ell_raw, -clamp, clamp) if clamp is not None else ell_raw
    ell_grad = (np.abs(ell_raw) <= clamp).astype(float) if clamp is not None else np.ones_like(ell_raw)
    r = np.exp(ell)
    per = np.zeros((B, T))
    grad = np.zeros((B, T))
    el, eh = cfg.eps_low, cfg.eps_high
    for i in range(B):
        valid = [t for t in range(T) if mask[i, t]]
        n = len(valid)
        L = sum(ell[i, t] for t in valid)
        for t in valid:
            a, w = A[i, t], r[i, t]
            if name in ("dr_grpo", "bnpo", "opsm", "trm"):  # token PPO clip (trm: with the dual clip 3)
                clipped = min(max(w, 1 - el), 1 + eh)
                v = max(-a * w, -a * clipped)
                g = -a * w if -a * w >= -a * clipped and not (a > 0 and w > 1 + eh) and not (a < 0 and w < 1 - el) \
                    else 0.0
                if name == "trm" and a < 0 and v > -a * 3.0:
                    v, g = -a * 3.0, 0.0
                per[i, t], grad[i, t] = v, g
            elif name == "sapo":
                tau = cfg.tau_pos if a > 0 else cfg.tau_neg
                s = 1 / (1 + math.exp(-tau * (w - 1)))
                per[i, t] = -a * s * 4 / tau
                grad[i, t] = -a * 4 * s * (1 - s) * w * ell_grad[i, t]
            elif name == "gppo":
                bound = min(w, 1 + eh) if a > 0 else (max(w, 1 - el) if a < 0 else w)
                per[i, t], grad[i, t] = -a * bound, -a * bound
            elif name in ("dppo_tv", "dppo_kl"):
                p, mu = math.exp(lp[i, t]), math.exp(old[i, t])
                if name == "dppo_tv":
                    ok = (p - mu <= eh) if a > 0 else (p - mu >= -el)
                else:
                    kl = mu * (old[i, t] - lp[i, t]) + (1 - mu) * math.log((1 - mu + 1e-8) / (1 - p + 1e-8))
                    ok = (kl <= eh or p <= mu) if a > 0 else (kl <= el or p >= mu)
                c = min(w, cfg.truncation)
                per[i, t] = -a * c * lp[i, t] if ok else 0.0
                grad[i, t] = -a * c if ok else 0.0
            elif name == "gpg":
                per[i, t], grad[i, t] = -a * lp[i, t], -a
            elif name == "topr":
                c = 1.0 if a >= 0 else min(math.exp(L), 1.0)
                per[i, t], grad[i, t] = -a * c * lp[i, t], -a * c
            elif name == "vespo":
                log_w = min(max(L, math.log(1e-8)), 20.0)
                k, lam = (cfg.kernel_power_pos, cfg.kernel_rate_pos) if a >= 0 else \
                    (cfg.kernel_power_neg, cfg.kernel_rate_neg)
                phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
                per[i, t], grad[i, t] = -a * phi * lp[i, t], -a * phi
            elif name == "luspo":  # GSPO's clipped sequence weight per token, each row's token sum
                s = math.exp(L / n)
                clipped = min(max(s, 1 - el), 1 + eh)
                per[i, t] = max(-a * s, -a * clipped)
                kept = not ((a > 0 and s > 1 + eh) or (a < 0 and s < 1 - el))
                grad[i, t] = -a * s if kept else 0.0
            elif name in ("m2po", "icepop", "cppo"):
                per[i, t], grad[i, t] = -a * w, -a * w * ell_grad[i, t]
            elif name == "gmpo":
                pass  # a row rule: below
            else:
                raise AssertionError(name)
    keep = _brute_force_keep(name, lp, old, ell, A, mask)
    per, grad = per * keep, grad * keep
    agg_mask = mask & keep.astype(bool) if name in ("trm", "m2po") else mask
    if name == "gmpo":
        return _gmpo_reference(lp, old, A, mask, el, eh)
    return _agg(per, grad, agg_mask, cfg.aggregation)


def _gmpo_reference(lp, old, A, mask, el, eh):
    B, T = lp.shape
    loss, grad = 0.0, np.zeros((B, T))
    for i in range(B):
        valid = [t for t in range(T) if mask[i, t]]
        n = len(valid)
        if n == 0:
            continue
        terms, live = [], []
        for t in valid:
            e, s = lp[i, t] - old[i, t], np.sign(A[i, t])
            ec = min(max(e, -el), eh)
            pess = s * min(s * e, s * ec)
            terms.append(pess)
            live.append(s != 0 and pess == e)
        ratio = math.exp(sum(terms) / (n + 1e-8))
        abar = sum(A[i, t] for t in valid) / (n + 1e-8)
        loss += -abar * ratio / B
        for t, lv in zip(valid, live):
            grad[i, t] = -abar * ratio / (n + 1e-8) / B if lv else 0.0
    return loss, grad


def _brute_force_keep(name, lp, old, ell, A, mask) -> np.ndarray:
    cfg = PRESETS[name]
    B, T = lp.shape
    keep = np.ones((B, T))
    for i in range(B):
        valid = [t for t in range(T) if mask[i, t]]
        if name == "icepop":
            for t in valid:
                keep[i, t] = float(cfg.mask_low <= math.exp(ell[i, t]) <= cfg.mask_high)
        elif name == "opsm":
            mean_kl = sum(-ell[i, t] for t in valid) / max(len(valid), 1)
            if A[i, valid[0]] < 0 and mean_kl > cfg.mask_threshold:
                keep[i, :] = 0.0
        elif name == "trm":
            k3 = [math.exp(-ell[i, t]) - 1 + ell[i, t] for t in valid]
            if max(k3) > cfg.mask_threshold:
                keep[i, :] = 0.0
        elif name == "cppo":
            n = len(valid)
            d = [abs(math.exp(lp[i, t]) - math.exp(old[i, t])) for t in valid]
            q = float(np.quantile(d, 0.9))
            budget = min(max(cfg.prefix_budget, q), 2 * cfg.prefix_budget)
            s_prev = w_prev = 0.0
            for j, t in enumerate(valid):
                w = 1 - (1 - cfg.position_weight_min) * j / max(n - 1, 1)
                z = w * d[j]
                feasible = z <= min(cfg.mask_threshold, cfg.mask_threshold + budget * w_prev - s_prev)
                toward = A[i, t] * (math.exp(ell[i, t]) - 1) <= 0
                keep[i, t] = float(feasible or toward)
                s_prev += z
                w_prev += w
    if name == "m2po":
        vals = sorted(((ell[i, t] ** 2, i, t) for i in range(B) for t in range(T) if mask[i, t]), reverse=True)
        removed = 0
        while removed < len(vals) and np.mean([v for v, *_ in vals[removed:]]) > cfg.mask_threshold:
            removed += 1
        for _, i, t in vals[:removed]:
            keep[i, t] = 0.0
    return keep


_HAND = [n for n in ZOO_PRESETS if n not in ("grpo", "dapo", "gspo", "cispo", "clip_cov", "kl_cov")]


def test_every_preset_has_a_source_line():
    assert set(PRESET_SOURCES) == set(PRESETS)
    assert all(len(v) > 20 for v in PRESET_SOURCES.values())


@pytest.mark.parametrize("name", _HAND)
@pytest.mark.parametrize("scale", [0.05, 0.6, 1.2])
@pytest.mark.parametrize("path", ["lean", "reference"])
def test_value_and_gradient_match_the_per_token_formula(name, scale, path):
    for seed in range(3):
        lp, old, adv, mask = _batch(seed, scale=scale)
        if name in ("m2po", "opsm", "trm"):  # make the mask bind on some rows: μ far above π on an A < 0 row
            row = int(torch.nonzero(adv < 0)[0])
            lp = torch.where(torch.arange(lp.shape[0])[:, None] == row, lp - 1.5, lp)
        x = lp.clone().requires_grad_()
        loss, _ = policy_loss(x, old, adv, mask, preset=name, path=path)
        loss.backward()
        ref_loss, ref_grad = _reference(name, lp.numpy(), old.numpy(), adv.numpy(), mask.numpy())
        assert loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12), (name, seed)
        np.testing.assert_allclose(x.grad.numpy(), ref_grad, rtol=1e-8, atol=1e-12, err_msg=f"{name} {seed}")


def test_the_masks_bind_in_these_tests():
    """The hand checks above are not vacuous: on the larger mismatch every mask rule drops some tokens."""
    lp, old, adv, mask = _batch(0, scale=1.2)
    row = int(torch.nonzero(adv < 0)[0])
    lp = torch.where(torch.arange(lp.shape[0])[:, None] == row, lp - 1.5, lp)
    for name in ("icepop", "opsm", "trm", "m2po", "cppo"):
        out = compute_policy_loss(lp, old, adv, mask, preset=name)
        assert 0 < out.metrics["pg_update/mask/rate"].item() < 1, name


def test_kl_cov_penalises_the_largest_covariance_tokens():
    lp, old, adv, mask = _batch(4, B=8, T=40, scale=0.3)
    a = adv[:, None].expand_as(lp)
    cov = (a - a[mask].mean()) * (lp - lp[mask].mean())
    k = max(1, int(mask.sum().item() * 0.02))
    top = torch.topk(torch.where(mask, cov, -torch.inf).flatten(), k).indices
    x = lp.clone().requires_grad_()
    loss, m = policy_loss(x, old, adv, mask, preset="kl_cov", cov_fraction=0.02)
    loss.backward()
    ell = (lp - old)
    r = ell.exp()
    per = -a * r
    per.view(-1)[top] += 0.1 * ell.abs().view(-1)[top]
    n = mask.sum()
    assert loss.item() == pytest.approx((per * mask).sum().item() / n.item(), rel=1e-12)
    g = -a * r
    g.view(-1)[top] += 0.1 * torch.sign(ell).view(-1)[top]
    torch.testing.assert_close(x.grad, torch.where(mask, g / n, 0.0), rtol=1e-10, atol=1e-14)
    assert m["actor/ppo_kl"] == pytest.approx((ell.abs() * mask).sum().item() / n.item())


def test_clip_cov_zeroes_only_candidates_and_is_reproducible_under_a_seed():
    lp, old, adv, mask = _batch(5, B=8, T=50, scale=0.3)
    adv = torch.where(adv == 0, 0.5, adv)  # a zeroed token of an A = 0 row would be invisible in the loss
    kw = dict(cov_fraction=0.05, cov_low=-1.0, cov_high=5.0)
    torch.manual_seed(0)
    o1 = compute_policy_loss(lp, old, adv, mask, preset="clip_cov", **kw)
    torch.manual_seed(0)
    o2 = compute_policy_loss(lp, old, adv, mask, preset="clip_cov", **kw)
    assert o1.loss.item() == o2.loss.item()
    grpo = compute_policy_loss(lp, old, adv, mask, preset="bnpo")  # the same PPO clip without the selection
    zeroed = mask & (o1.clip.per_token_loss == 0) & (grpo.clip.per_token_loss != 0)
    a = adv[:, None].expand_as(lp)
    cov = (a - a[mask].mean()) * (lp - lp[mask].mean())
    assert zeroed.sum().item() == max(int(0.05 * mask.sum().item()), 1)
    assert bool(((cov[zeroed] > -1.0) & (cov[zeroed] < 5.0)).all())
    assert not bool(grpo.clip.clipped_term_active[zeroed].any())  # never a token the PPO clip already clipped
    assert o1.metrics["actor/pg_clipfrac"].item() == pytest.approx(zeroed.sum().item() / mask.sum().item())


def test_m2po_greedy_mask_equals_brute_force_on_random_batches():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        ell = torch.randn(4, 9, generator=g, dtype=torch.float64) * 0.4
        mask = torch.rand(4, 9, generator=g) > 0.3
        tau = float(torch.rand(1, generator=g)) * 0.1
        keep = masks.m2po_keep(ell, mask, tau)
        vals = sorted(((ell[i, t].item() ** 2, i, t) for i in range(4) for t in range(9) if mask[i, t]),
                      reverse=True)
        j = 0
        while j < len(vals) and np.mean([v for v, *_ in vals[j:]]) > tau:
            j += 1
        expected = mask.clone()
        for _, i, t in vals[:j]:
            expected[i, t] = False
        assert torch.equal(keep, expected), seed
        if keep.any():
            assert (ell[keep] ** 2).mean().item() <= tau + 1e-12


def test_cispo_value_is_verls_log_prob_form_and_counts_both_sides():
    lp, old, adv, mask = _batch(6, scale=0.5)
    out = compute_policy_loss(lp, old, adv, mask, preset="cispo")
    r = (lp - old).exp()
    c = r.clamp(0.8, 1.2)
    per = -adv[:, None] * c * lp
    assert out.loss.item() == pytest.approx((per * mask).sum().item() / mask.sum().item(), rel=1e-12)
    frac = ((r != c) & mask).sum().item() / mask.sum().item()
    assert out.metrics["actor/pg_clipfrac"].item() == pytest.approx(frac)


def test_gspo_does_not_clamp_token_log_ratios():
    """One token at ℓ = 25 moves GSPO's sequence mean by 25/n (verl clamps nothing before the mean)."""
    old = torch.full((1, 10), -1.0, dtype=torch.float64)
    lp = old.clone()
    lp[0, 3] += 25.0
    ell_mean = 25.0 / 10
    assert compute_policy_loss(lp, old, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 10, dtype=torch.bool),
                               preset="gspo").log_weight_value[0, 0].item() == pytest.approx(ell_mean)


def test_surrogate_rules_refuse_other_ratio_families():
    with pytest.raises(ValueError, match="ratio"):
        PRESETS["sapo"].__class__(**{**PRESETS["sapo"].__dict__, "ratio": "cumulative"})


@pytest.mark.parametrize("field,value", [("mask_threshold", None), ("mask_threshold", -1.0), ("tau_pos", 0.0),
                                         ("position_weight_min", 1.5), ("mask_statistic", "k9")])
def test_bad_zoo_parameters_are_clear_errors(field, value):
    base = {"mask_threshold": "cppo", "tau_pos": "sapo", "position_weight_min": "cppo", "mask_statistic": "trm"}
    with pytest.raises(ValueError, match=field):
        policy_loss(*_batch(0), preset=base[field], **{field: value})
