"""Policy losses: hand-computed values, analytic gradients, masking, bad input, extremes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctpo_lab.losses import (
    PRESETS,
    LossConfig,
    aggregate,
    compute_policy_loss,
    lean_path_applies,
    metrics_to_host,
    policy_loss,
    resolve_config,
)


def _batch(seed: int = 0, B: int = 5, T: int = 9, scale: float = 0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3 - 0.1
    lp = old + torch.randn(B, T, generator=g, dtype=dtype) * scale
    adv = torch.randn(B, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, :] = True
    mask[1, :4] = False  # left padding / tool output in the middle of a row
    mask[2, 3:5] = False
    return lp, old, adv, mask


# ---------------------------------------------------------------- hand-computed values

def test_grpo_hand_computed():
    # two tokens, A = +1 then A = -1 rows; ratios e^{0.5}, e^{-0.1}
    lp = torch.tensor([[math.log(0.5), math.log(0.2)], [math.log(0.5), math.log(0.2)]], dtype=torch.float64)
    old = lp - torch.tensor([[0.5, -0.1], [0.5, -0.1]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, m = policy_loss(lp, old, adv, mask, preset="grpo")
    r1, r2 = math.exp(0.5), math.exp(-0.1)
    # row A=+1: max(-r, -clip(r)) = -min(r, clip) -> -1.2 for r1, -r2 for r2 (inside window)
    # row A=-1: max(r, clip(r)) -> r1 (1.6487 < dual 3), r2 (0.905 inside window)
    expected = (-1.2 - r2 + r1 + r2) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert m["pg_update/clip/high/rate"] == pytest.approx(0.25)  # A>0 and r1 > 1.2
    assert m["pg_update/clip/low/rate"] == 0.0
    assert m["actor/pg_clipfrac"] == pytest.approx(0.25)  # the clipped term is active for A>0, r1 only
    assert m["actor/ppo_kl"] == pytest.approx(-(0.5 - 0.1) / 2)


def test_ctpo_hand_computed():
    # one row, A = +1, ℓ = (0.02, 0.03, 0.04): L = (0.02, 0.05, 0.09);
    # window upper 0.05·sqrt(t) = (0.05, 0.0707, 0.0866): token 3 clipped at e^{0.0866}
    ell = torch.tensor([[0.02, 0.03, 0.04]], dtype=torch.float64)
    old = torch.full((1, 3), -1.0, dtype=torch.float64)
    lp = old + ell
    loss, m = policy_loss(lp, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 3), preset="ctpo")
    expected = -(math.exp(0.02) + math.exp(0.05) + math.exp(0.05 * math.sqrt(3))) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert m["pg_update/clip/high/rate"] == pytest.approx(1 / 3)
    # the same with A = -1: lower window −0.025·sqrt(t) is never hit, dual bound e^{0.05 sqrt t} = upper bound,
    # so token 3 (w above the dual bound) takes the dual value
    loss, m = policy_loss(lp, old, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 3), preset="ctpo")
    expected = (math.exp(0.02) + math.exp(0.05) + math.exp(0.05 * math.sqrt(3))) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert m["pg_update/clip/dual/rate"] == pytest.approx(1 / 3)


def test_aggregations_hand_computed():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert aggregate(per_token, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(per_token, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    # verl >= 0.9: the seq-mean over non-empty rows, then / horizon; the earlier form has no / rows
    assert aggregate(per_token, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / 2 / 3)
    assert aggregate(per_token, mask, "seq-mean-token-sum-norm", norm_horizon=5).item() == pytest.approx(1.0)
    assert aggregate(per_token, mask, "seq-sum-token-sum-norm").item() == pytest.approx(10 / 3)
    assert aggregate(per_token, mask, "seq-sum-token-sum-norm", norm_horizon=5).item() == pytest.approx(2.0)
    assert aggregate(per_token, mask, "token-sum").item() == pytest.approx(10.0)
    # TRL's row means count the empty row in B = 3
    assert aggregate(per_token, mask, "all-seq-mean-token-mean").item() == pytest.approx((2 + 4 + 0) / 3)
    assert aggregate(per_token, mask, "all-seq-mean-token-sum").item() == pytest.approx((6 + 4 + 0) / 3)
    # verl's global-batch scaling
    assert aggregate(per_token, mask, "token-mean", dp_size=4, batch_num_tokens=20).item() == pytest.approx(10 / 20 * 4)
    assert aggregate(per_token, mask, "token-sum", dp_size=2).item() == pytest.approx(20.0)
    assert aggregate(per_token, mask, "seq-mean-token-sum", dp_size=2,
                     global_batch_size=8).item() == pytest.approx(10 / 8 * 2)
    assert aggregate(per_token, mask, "seq-mean-token-mean", dp_size=2,
                     global_batch_size=8).item() == pytest.approx(6 / 8 * 2)


# ---------------------------------------------------------------- analytic gradient (independent numpy)

def _analytic_grad(cfg: LossConfig, lp, old, adv, mask) -> np.ndarray:
    """d loss / d log_prob written from the per-token formula of the losses module docstring, in numpy float64."""
    lp, old, adv, mask = lp.numpy(), old.numpy(), adv.numpy(), mask.numpy()
    B, T = lp.shape
    grad = np.zeros((B, T))
    n_tok = mask.sum()
    rows = (mask.sum(1) > 0).sum()
    for i in range(B):
        valid = np.where(mask[i])[0]
        ell = np.clip(lp[i, valid] - old[i, valid], -20, 20)
        L = np.cumsum(ell)
        t = np.arange(1, len(valid) + 1)
        X = {
            "token": ell, "cumulative": L, "sequence": np.full_like(L, L[-1] if len(L) else 0.0),
            "sequence_geomean": np.full_like(L, L[-1] / len(L) if len(L) else 0.0), "cumulative_geomean": L / t,
            "token_tis": np.minimum(ell, math.log(cfg.truncation or 1.0)),
            "truncated_cumulative": np.cumsum(np.minimum(ell, math.log(cfg.truncation or 1.0))),
        }[cfg.ratio]
        for j, k in enumerate(valid):
            a = adv[i]
            if cfg.max_log_weight is not None and X[j] >= cfg.max_log_weight:
                continue
            w = math.exp(X[j])
            if cfg.clip == "detached_clip":
                g = -a * min(max(w, 1 - cfg.eps_low), 1 + cfg.eps_high)
            else:
                if cfg.clip == "ppo":
                    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
                    dual = cfg.dual_clip
                elif cfg.clip == "none":
                    lo, hi, dual = 0.0, math.inf, cfg.dual_clip
                else:  # log_window
                    s = t[j] ** cfg.clip_exponent
                    lo, hi = math.exp(-cfg.eps_low * s), math.exp(cfg.eps_high * s)
                    dual = None if cfg.dual_clip is None else math.exp(cfg.dual_clip * s)
                clipped = min(max(w, lo), hi)
                inside = lo < w < hi
                unclipped_wins = inside or (-a * w > -a * clipped)
                g = -a * w if unclipped_wins else 0.0
                c1 = max(-a * w, -a * clipped)
                if dual is not None and a < 0 and -a * dual < c1:
                    g = 0.0
            if cfg.aggregation == "token-mean":
                g /= n_tok
            elif cfg.aggregation == "seq-mean-token-mean":
                g /= rows * len(valid)
            elif cfg.aggregation == "seq-mean-token-sum":
                g /= rows
            grad[i, k] = g
    return grad


# the clip-window presets whose gradient _analytic_grad writes out (the other rules: tests/test_zoo.py)
_WINDOW_PRESETS = sorted(
    n for n, c in PRESETS.items()
    if c.clip in ("ppo", "log_window", "detached_clip", "none") and c.mask_rule == "none"
    and c.aggregation in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
)
# the presets whose lean path is the fused gradient (the others run the reference path on both settings)
_LEAN_PRESETS = sorted(n for n, c in PRESETS.items() if lean_path_applies(c))


@pytest.mark.parametrize("name", _WINDOW_PRESETS)
@pytest.mark.parametrize("scale", [0.02, 0.4])
def test_autograd_matches_analytic_gradient(name, scale):
    lp, old, adv, mask = _batch(seed=3, scale=scale)
    lp = lp.clone().requires_grad_()
    out = compute_policy_loss(lp, old, adv, mask, preset=name)
    out.loss.backward()
    expected = _analytic_grad(PRESETS[name], lp.detach(), old, adv, mask)
    np.testing.assert_allclose(lp.grad.numpy(), expected, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------- masking, extremes, dtypes

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_masked_positions_do_not_matter(name):
    lp, old, adv, mask = _batch(seed=5)
    lp1 = lp.clone().requires_grad_()
    loss1, m1 = policy_loss(lp1, old, adv, mask, preset=name)
    loss1.backward()
    lp2 = torch.where(mask, lp, torch.nan).requires_grad_()
    old2 = torch.where(mask, old, torch.inf)
    adv_tok = torch.where(mask, adv[:, None].expand_as(lp), torch.nan)
    loss2, m2 = policy_loss(lp2, old2, adv_tok, mask, preset=name)
    loss2.backward()
    assert loss1.item() == loss2.item()
    assert torch.equal(lp1.grad, lp2.grad)
    assert torch.all(lp2.grad[~mask] == 0)
    assert m1 == m2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_empty_batch_gives_zero_loss_and_zero_grad(name):
    lp = torch.randn(3, 4, requires_grad=True)
    loss, m = policy_loss(lp, torch.randn(3, 4), torch.randn(3), torch.zeros(3, 4, dtype=torch.bool), preset=name)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(lp.grad == 0)
    assert m["pg_update/num_tokens"] == 0


# the bare cumulative and sequence weights e^{L} have no cap, and the presets that follow verl/TRL in not
# clamping ℓ_t have an unbounded weight on some side: e^{1e4} overflows by definition (a clear error, tested below)
_BOUNDED = sorted(
    n for n, c in PRESETS.items()
    if c.max_log_weight is not None
    or (c.ratio not in ("cumulative", "sequence") and (c.log_ratio_clamp is not None or c.clip == "vespo"))
)


@pytest.mark.parametrize("name", _BOUNDED)
def test_extreme_log_ratios_stay_finite(name):
    g = torch.Generator().manual_seed(0)
    old = torch.zeros(4, 64)
    lp = (torch.randint(0, 2, (4, 64), generator=g).float() * 2 - 1).mul(1e4).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5])
    loss, m = policy_loss(lp, old, adv, torch.ones(4, 64), preset=name)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(lp.grad).all()
    assert all(math.isfinite(v) or k.endswith(("max", "p99", "p95", "p90")) for k, v in m.items())


def test_low_precision_inputs_are_computed_in_float32():
    lp, old, adv, mask = _batch(seed=1, dtype=torch.float32)
    ref, _ = policy_loss(lp, old, adv, mask, preset="ctpo")
    out = compute_policy_loss(lp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask, preset="ctpo")
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.item(), rel=0.05, abs=5e-3)
    assert compute_policy_loss(*_batch(seed=1), preset="ctpo").loss.dtype == torch.float64


def test_float32_matches_float64():
    lp, old, adv, mask = _batch(seed=2)
    for name in PRESETS:
        l64, _ = policy_loss(lp, old, adv, mask, preset=name)
        l32, _ = policy_loss(lp.float(), old.float(), adv.float(), mask, preset=name)
        assert l32.item() == pytest.approx(l64.item(), rel=1e-4, abs=1e-6), name


# ---------------------------------------------------------------- presets and overrides

def test_preset_fields_match_reference():
    p = PRESETS
    assert (p["grpo"].eps_low, p["grpo"].eps_high, p["grpo"].dual_clip, p["grpo"].aggregation) == (
        0.2, 0.2, 3.0, "token-mean")
    assert p["dapo"].eps_high == 0.28
    assert (p["gspo"].eps_low, p["gspo"].eps_high, p["gspo"].dual_clip, p["gspo"].aggregation) == (
        3e-4, 4e-4, None, "seq-mean-token-mean")
    c = p["ctpo"]
    assert (c.ratio, c.clip, c.eps_low, c.eps_high, c.dual_clip, c.clip_exponent, c.aggregation) == (
        "cumulative", "log_window", 0.025, 0.05, 0.05, 0.5, "token-mean")
    assert p["ctpo_fixed"].clip_exponent == 0.0 and p["ctpo_fixed"].eps_high == 0.05
    assert p["ctpo_geomean"].ratio == "cumulative_geomean" and p["ctpo_geomean"].clip_exponent == -0.5
    assert p["seq_is"].ratio == "sequence" and p["seq_is"].clip == "ppo"


def test_overrides_change_the_loss():
    lp, old, adv, mask = _batch(seed=4, scale=0.5)
    base, _ = policy_loss(lp, old, adv, mask, preset="grpo")
    dapo, _ = policy_loss(lp, old, adv, mask, preset="dapo")
    over, _ = policy_loss(lp, old, adv, mask, preset="grpo", eps_high=0.28)
    assert over.item() == dapo.item() != base.item()
    assert resolve_config("ctpo", clip_exponent=0.0) == PRESETS["ctpo_fixed"].__class__(
        **{**PRESETS["ctpo_fixed"].__dict__, "name": "ctpo"})


def test_ctpo_paper_windows():
    # windows at p=0.5 (docs/estimators.md §2.4):
    # t=1 [0.975, 1.051]; t=100 [0.779, 1.649]; t=1000 [0.454, 4.86]; t=8000 [0.107, 87.5]
    from ctpo_lab.clipping import clip_window

    c = PRESETS["ctpo"]
    t = torch.tensor([[1, 100, 1000, 8000]])
    lower, upper = clip_window(c.clip, t, c.eps_low, c.eps_high, c.clip_exponent, torch.float64)
    np.testing.assert_allclose(lower.exp().numpy()[0], [0.975, 0.779, 0.454, 0.107], atol=6e-4)
    np.testing.assert_allclose(upper.exp().numpy()[0], [1.051, 1.649, 4.86, 87.5], rtol=2e-3)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "kwargs, err, word",
    [
        ({"preset": "nope"}, ValueError, "preset"),
        ({"preset": 3}, TypeError, "preset"),
        ({"bogus": 1}, ValueError, "bogus"),
        ({"eps_low": 0.0}, ValueError, "eps_low"),
        ({"eps_high": -1.0}, ValueError, "eps_high"),
        ({"eps_high": float("nan")}, ValueError, "eps_high"),
        ({"dual_clip": 1.0}, ValueError, "dual_clip"),
        ({"aggregation": "mean"}, ValueError, "aggregation"),
        ({"ratio": "tokens"}, ValueError, "ratio"),
        ({"ratio": "token_tis"}, ValueError, "truncation"),
    ],
)
def test_bad_options(kwargs, err, word):
    lp, old, adv, mask = _batch()
    with pytest.raises(err, match=word):
        policy_loss(lp, old, adv, mask, **kwargs)


def test_bad_tensors():
    lp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="old_log_prob"):
        policy_loss(lp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="log_prob"):
        policy_loss(lp[0], old[0], adv, mask[0])
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="response_mask"):
        policy_loss(lp, old, adv, mask[:, :-1])
    with pytest.raises(TypeError, match="log_prob"):
        policy_loss(lp.long(), old, adv, mask)
    with pytest.raises(TypeError, match="advantages"):
        policy_loss(lp, old, np.ones(5), mask)
    bad = lp.clone()
    bad[0, 0] = torch.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        policy_loss(bad, old, adv, mask)
    bad_adv = adv.clone()
    bad_adv[0] = torch.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        policy_loss(lp, old, bad_adv, mask)


# ---------------------------------------------------------------- the lean path equals the reference path

def _both_paths(name, lp, old, adv, mask, diagnostics, **kw):
    out = {}
    for path in ("reference", "lean"):
        x = lp.clone().requires_grad_()
        o = compute_policy_loss(x, old, adv, mask, preset=name, path=path, diagnostics=diagnostics, **kw)
        o.loss.backward()
        out[path] = (o, x.grad, metrics_to_host(o.metrics, o.num_nonfinite))
    return out["reference"], out["lean"]


@pytest.mark.parametrize("name", _LEAN_PRESETS)
@pytest.mark.parametrize("diagnostics", ["basic", "full"])
@pytest.mark.parametrize("scale", [0.05, 0.5])
@pytest.mark.parametrize("per_token", [False, True])
def test_lean_path_equals_reference(name, diagnostics, scale, per_token):
    lp, old, adv, mask = _batch(seed=11, B=7, T=13, scale=scale)
    adv[3] = 0.0  # a zero-advantage row (GRPO groups with equal rewards)
    if per_token:
        adv = adv[:, None] * (1 + torch.rand(lp.shape, generator=torch.Generator().manual_seed(1), dtype=lp.dtype))
    (ro, rg, rm), (lo, lg, lm) = _both_paths(name, lp, old, adv, mask, diagnostics)
    assert set(rm) == set(lm)
    if diagnostics == "basic":
        assert set(lm) == {"actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"}
    for k in rm:
        assert lm[k] == pytest.approx(rm[k], rel=1e-12, abs=1e-12), k
    torch.testing.assert_close(lo.loss, ro.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lg, rg, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lo.log_weight_value, ro.log_weight_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lo.clip.per_token_loss[mask], ro.clip.per_token_loss.detach()[mask], rtol=1e-12,
                               atol=1e-14)
    if diagnostics == "full":
        for f in ("clipped_high", "clipped_low", "clipped_dual", "clipped_term_active"):
            assert torch.equal(getattr(lo.clip, f) & mask, getattr(ro.clip, f) & mask), f
        assert torch.equal(lo.position, ro.position)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                         "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("name", ["grpo", "gspo", "ctpo", "cispo", "seq_is"])
def test_lean_path_equals_reference_every_aggregation_float32(aggregation, name):
    """float32, a large batch: the lean gradient reproduces autograd's operations (bit-identical here)."""
    g = torch.Generator().manual_seed(4)
    B, T = 16, 300
    old = -torch.rand(B, T, generator=g) * 3
    lp = old + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    adv[:3] = 0.0
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[5] = False
    (ro, rg, rm), (lo, lg, lm) = _both_paths(name, lp, old, adv, mask, "full", aggregation=aggregation)
    assert lo.loss.item() == ro.loss.item()
    torch.testing.assert_close(lg, rg, rtol=2e-7, atol=0)
    assert lm == rm


@pytest.mark.parametrize("name", ["grpo", "ctpo", "ctpo_fixed", "gspo"])
@pytest.mark.parametrize("case", ["nan_off_mask", "inf_off_mask", "cumsum_overflow", "inf_adv_empty_row"])
def test_lean_basic_guards_its_float_zeroing(name, case):
    """"basic" on the CPU zeroes masked-out entries by a 0/1 multiply only when every input is finite; NaN/inf
    off the mask (x·0 = NaN), a cumulative sum that overflows float32, or an infinite advantage on a row with no
    valid token take the masked_fill path: values, gradient and metrics stay those of the reference path."""
    lp, old, adv, mask = _batch(seed=5, B=6, T=11, dtype=torch.float32)
    adv[4] = 0.0
    if case == "nan_off_mask":
        lp[1, 0] = math.nan  # mask[1, :4] is False
    elif case == "inf_off_mask":
        old[2, 3] = -math.inf  # mask[2, 3:5] is False
    elif case == "cumsum_overflow":
        lp[0, :] = 3e38  # row 0 fully valid: ℓ_t ≈ 3e38 each, Σ_{k≤t} ℓ_k overflows to inf at t = 2
    else:
        mask[5, :] = False
        adv[5] = math.inf
    (ro, rg, rm), (lo, lg, lm) = _both_paths(name, lp, old, adv, mask, "basic")
    torch.testing.assert_close(lo.loss, ro.loss, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(lg, rg, rtol=1e-6, atol=0, equal_nan=True)
    assert int(lo.num_nonfinite) == int(ro.num_nonfinite)
    assert set(lm) == set(rm)
    for k in rm:
        assert lm[k] == pytest.approx(rm[k], rel=1e-6, abs=1e-9, nan_ok=True), k
    assert bool(torch.isfinite(lo.log_ratio[~mask]).all()) and bool((lo.log_ratio[~mask] == 0).all())
    if case != "cumsum_overflow":
        assert math.isfinite(lo.loss.item()) and bool(torch.isfinite(lg).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [300, 6000])  # 6000: past the float32 exactness bound of the prefix test
@pytest.mark.parametrize("layout", ["prefix", "left_pad", "hole", "late_start"])
def test_lean_basic_sqrt_t_positions_on_prefix_and_other_masks(dtype, T, layout):
    """"basic" takes s_t = (column + 1)^p when every row's valid tokens are its first columns; a left-padded
    row, a hole or a row starting late (same row counts as a prefix) must not be taken for one."""
    g = torch.Generator().manual_seed(7)
    B = 5
    old = (-torch.rand(B, T, generator=g) * 3).to(dtype)
    lp = old + (torch.randn(B, T, generator=g) * 0.1).to(dtype)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 0.0], dtype=dtype)
    lengths = torch.tensor([T, T // 2, T // 4, 0, T - 3])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if layout == "left_pad":
        mask[1] = mask[1].flip(0)
    elif layout == "hole":
        mask[0, T // 3] = False
    elif layout == "late_start":  # row 2's valid block one column later (the same row count as a prefix)
        mask[2] = mask[2].roll(1)
    for name in ("ctpo", "sqrt_t_window"):
        (ro, rg, rm), (lo, lg, lm) = _both_paths(name, lp, old, adv, mask, "basic")
        torch.testing.assert_close(lo.loss, ro.loss, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
        torch.testing.assert_close(lg, rg, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-12)
        assert lm == pytest.approx(rm, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["prefix", "hole"])
def test_lean_basic_takes_column_positions_only_on_prefix_masks(monkeypatch, dtype, layout):
    """On a prefix mask the √t factors come from the columns: no per-token positions are computed; on a mask
    with a hole they are."""
    from ctpo_lab import ratios

    calls = []
    real = ratios.positions
    monkeypatch.setattr(ratios, "positions", lambda m: calls.append(m.shape) or real(m))
    lp, old, adv, mask = _batch(seed=3, B=6, T=40)
    lp, old, adv = lp.to(dtype), old.to(dtype), adv.to(dtype)
    mask = torch.arange(40)[None, :] < torch.tensor([40, 30, 12, 1, 0, 25])[:, None]
    if layout == "hole":
        mask[0, 5] = False
    out = compute_policy_loss(lp.requires_grad_(), old, adv, mask, preset="ctpo", diagnostics="basic")
    out.loss.backward()
    assert bool(torch.isfinite(lp.grad).all())
    assert len(calls) == (0 if layout == "prefix" else 1)


@pytest.mark.parametrize("name", ["ctpo", "grpo", "dapo", "sqrt_t_window"])
def test_lean_backward_twice_keeps_the_first_gradient(name):
    """The first backward writes its gradient into a buffer the forward no longer needs (and autograd takes it
    as .grad); a second backward through a retained graph must leave that gradient as it was and give the same
    values (nothing the backward reads may have been overwritten by the first one)."""
    lp, old, adv, mask = _batch(seed=5, B=6, T=40)
    lp.requires_grad_()
    out = compute_policy_loss(lp, old, adv, mask, preset=name, diagnostics="basic")
    out.loss.backward(retain_graph=True)
    first = lp.grad
    first_values = first.clone()
    lp.grad = None
    out.loss.backward()
    assert torch.equal(first, first_values)
    assert torch.equal(lp.grad, first_values)


def test_bad_diagnostics_and_path():
    lp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="diagnostics"):
        policy_loss(lp, old, adv, mask, diagnostics="some")
    with pytest.raises(ValueError, match="path"):
        policy_loss(lp, old, adv, mask, path="fast")


@pytest.mark.parametrize("name", ["ctpo", "ctpo_fixed", "ctpo_geomean", "sqrt_t_window", "fixed_window", "gspo"])
@pytest.mark.parametrize("diagnostics", ["basic", "full"])
def test_lean_path_zero_advantage_rows_and_the_cap(name, diagnostics):
    """Rows with A = 0 and log-weights far beyond the cap (10): finite, and equal to the reference."""
    old = -torch.rand(6, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lp = old + 3.0
    adv = torch.tensor([0.0, 1.0, -1.0, 0.0, 2.0, -0.5], dtype=torch.float64)
    (ro, rg, rm), (lo, lg, lm) = _both_paths(name, lp, old, adv, torch.ones(6, 50, dtype=torch.bool), diagnostics)
    assert math.isfinite(lo.loss.item()) and lo.loss.item() == ro.loss.item()
    assert torch.equal(lg, rg)
    assert lm == rm
