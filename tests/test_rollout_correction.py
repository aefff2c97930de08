"""Rollout–training mismatch correction (:mod:`ctpo_lab.rollout_correction`) through ``policy_loss``.

* every mode against hand-computed values: token/sequence TIS, IcePop, each rejection statistic and level,
  chaining, batch normalisation, bypass ppo_clip / reinforce, TRL's four vLLM modes, AReaL's decoupled weight,
  the cumulative level; input validation; ``rollout_correction=None`` changes nothing;
* verl parity (skipped without verl; run in the verl venv): the presets equal verl's classmethods, and on random
  float64 batches with holes and an empty row the weights, modified mask and every ``rollout_corr/*`` metric
  equal verl's ``compute_rollout_correction_and_rejection_mask`` (1e-7), the decoupled losses equal verl's
  vanilla loss with those weights and mask (value and gradient), the bypass losses verl's ``bypass_mode``.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from ctpo_lab.losses import compute_policy_loss, policy_loss
from ctpo_lab.rollout_correction import (
    ROLLOUT_CORRECTION_SOURCES,
    ROLLOUT_CORRECTIONS,
    RolloutCorrection,
    compute_rollout_correction,
)

D = torch.float64
L2, L3 = math.log(2.0), math.log(3.0)


def _inputs(ell, mask, adv=None, lp_offset=None):
    """old = −1 + ℓ, rollout = −1 (so log π_old − log μ = ℓ); log π = old (+ offset)."""
    ell = torch.tensor(ell, dtype=D)
    mask = torch.tensor(mask, dtype=torch.bool)
    rollout = torch.full_like(ell, -1.0)
    old = rollout + ell
    lp = (old if lp_offset is None else old + torch.tensor(lp_offset, dtype=D)).clone().requires_grad_()
    adv = torch.ones(ell.shape[0], dtype=D) if adv is None else torch.tensor(adv, dtype=D)
    return lp, old, adv, mask, rollout


def _corr(name_or_cfg, ell, mask, **kw):
    lp, old, adv, mask, rollout = _inputs(ell, mask, **kw)
    return compute_rollout_correction(lp, old, rollout, mask, name_or_cfg)


ELL = [[math.log(3.0), math.log(0.6), 0.0], [math.log(1.5), 0.7, -0.3]]
MASK = [[1, 1, 1], [1, 0, 0]]


def test_every_correction_has_a_source():
    assert set(ROLLOUT_CORRECTIONS) == set(ROLLOUT_CORRECTION_SOURCES)
    for name, c in ROLLOUT_CORRECTIONS.items():
        assert c.name == name


# ------------------------------------------------------------------------------------------------ IS weights
def test_token_tis():
    out = _corr("decoupled_token_is", ELL, MASK)
    torch.testing.assert_close(out.weights, torch.tensor([[2.0, 0.6, 1.0], [1.5, 0.0, 0.0]], dtype=D))
    assert torch.equal(out.response_mask, torch.tensor(MASK, dtype=torch.bool))
    m = out.metrics
    assert m["rollout_corr/rollout_is_mean"].item() == pytest.approx(5.1 / 4)
    assert m["rollout_corr/rollout_is_max"].item() == pytest.approx(2.0)
    assert m["rollout_corr/rollout_is_min"].item() == pytest.approx(0.6)
    # raw ratios 3, 0.6, 1, 1.5: one above 2, none below 1/2
    assert m["rollout_corr/rollout_is_ratio_fraction_high"].item() == pytest.approx(0.25)
    assert m["rollout_corr/rollout_is_ratio_fraction_low"].item() == pytest.approx(0.0)
    w = torch.tensor([2.0, 0.6, 1.0, 1.5], dtype=D)
    assert m["rollout_corr/rollout_is_std"].item() == pytest.approx(float(w.var(unbiased=False).sqrt()))
    assert m["rollout_corr/rollout_is_eff_sample_size"].item() == pytest.approx(
        float(1.0 / ((w / (w.mean() + 1e-8)) ** 2).mean()))
    assert m["rollout_corr/rollout_is_seq_mean"].item() == pytest.approx((3.6 / 3 + 1.5) / 2)
    assert m["rollout_corr/rollout_is_seq_max_deviation"].item() == pytest.approx(0.5)
    assert "rollout_corr/rollout_is_oob_ratio" not in m


def test_sequence_tis_and_metrics_over_rows():
    out = _corr("decoupled_seq_is", [[L3, math.log(0.5), 0.0], [math.log(2.5), 9.0, 9.0]], MASK)
    # row products 1.5 and 2.5 → min(·, 2)
    torch.testing.assert_close(out.weights, torch.tensor([[1.5, 1.5, 1.5], [2.0, 0.0, 0.0]], dtype=D))
    m = out.metrics
    assert m["rollout_corr/rollout_is_max"].item() == pytest.approx(2.5)  # raw, from the log sums
    assert m["rollout_corr/rollout_is_min"].item() == pytest.approx(1.5)
    assert m["rollout_corr/rollout_is_ratio_fraction_high"].item() == pytest.approx(0.5)
    assert m["rollout_corr/rollout_is_mean"].item() == pytest.approx((4.5 + 2.0) / 4)  # token-weighted


def test_icepop_zeroes_outside_the_band_and_keeps_the_mask():
    ell = [[math.log(6.0), math.log(0.4), math.log(0.55)], [math.log(4.9), 0.0, 0.0]]
    out = _corr("decoupled_token_icepop", ell, MASK)
    torch.testing.assert_close(out.weights, torch.tensor([[0.0, 0.0, 0.55], [4.9, 0.0, 0.0]], dtype=D))
    assert torch.equal(out.response_mask, torch.tensor(MASK, dtype=torch.bool))
    assert out.metrics["rollout_corr/rollout_is_oob_ratio"].item() == pytest.approx(0.5)
    # the zeroed tokens stay in token-mean's denominator: loss = −(0 + 0 + 0.55 + 4.9)/4 at ratio 1
    lp, old, adv, mask, rollout = _inputs(ell, MASK)
    loss, _ = policy_loss(lp, old, adv, mask, "grpo", rollout_log_prob=rollout,
                          rollout_correction="decoupled_token_icepop")
    assert loss.item() == pytest.approx(-5.45 / 4)


def test_batch_normalisation():
    c = dataclasses.replace(ROLLOUT_CORRECTIONS["decoupled_token_is"], rollout_is_batch_normalize=True)
    out = _corr(c, ELL, MASK)
    torch.testing.assert_close(out.weights, torch.tensor([[2.0, 0.6, 1.0], [1.5, 0.0, 0.0]], dtype=D) / 1.275)
    assert out.metrics["rollout_corr/rollout_is_batch_norm_factor"].item() == pytest.approx(1.275)
    assert out.metrics["rollout_corr/rollout_is_mean"].item() == pytest.approx(1.275)  # before normalisation
    # sequence level: the mean over rows (1.5 and 2), not over tokens
    c = dataclasses.replace(ROLLOUT_CORRECTIONS["decoupled_seq_is"], rollout_is_batch_normalize=True)
    out = _corr(c, [[L3, math.log(0.5), 0.0], [math.log(2.5), 0.0, 0.0]], MASK)
    torch.testing.assert_close(out.weights, torch.tensor([[1.5, 1.5, 1.5], [2.0, 0, 0]], dtype=D) / 1.75)


# ------------------------------------------------------------------------------------------------ rejection
def _k(ell):
    return {"k1": -ell, "k2": 0.5 * ell * ell, "k3": math.exp(ell) - 1.0 - ell}


@pytest.mark.parametrize("stat", ["k1", "k2", "k3"])
@pytest.mark.parametrize("level", ["token", "seq_sum", "seq_mean", "seq_max"])
def test_each_rejection_statistic(stat, level):
    if level == "seq_max" and stat == "k1":
        with pytest.raises(ValueError, match="rollout_rs"):
            RolloutCorrection(rollout_is=None, rollout_rs="seq_max_k1", rollout_rs_threshold=1.0)
        return
    ell = [[0.05, -0.4, 0.1, 0.0], [0.02, -0.01, 9.0, 9.0], [0.3, 0.3, 0.3, 0.0]]
    mask = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    threshold = "0.8_1.1" if stat == "k1" else 0.01
    option = f"{level}_{stat}"
    c = RolloutCorrection(rollout_is=None, rollout_rs=option, rollout_rs_threshold=threshold)
    out = _corr(c, ell, mask)
    lo, hi = (math.log(0.8), math.log(1.1)) if stat == "k1" else (-math.inf, 0.01)
    expect = []
    for row, mrow in zip(ell, mask):
        vals = [_k(x)[stat] for x, m in zip(row, mrow) if m]
        if level == "token":
            keep = [lo <= _k(x)[stat] <= hi for x in row]
        else:
            agg = {"seq_sum": sum(vals), "seq_mean": sum(vals) / len(vals), "seq_max": max(vals)}[level]
            keep = [lo <= agg <= hi] * len(row)
        expect.append([bool(k and m) for k, m in zip(keep, mrow)])
    assert out.response_mask.tolist() == expect
    n_valid = sum(map(sum, mask))
    rejected = n_valid - sum(map(sum, expect))
    assert out.metrics["rollout_corr/rollout_rs_masked_fraction"].item() == pytest.approx(rejected / n_valid)
    assert out.metrics[f"rollout_corr/rollout_rs_{option}_masked_fraction"].item() == pytest.approx(
        rejected / n_valid)
    assert out.weights is None


def test_k1_single_bound_means_reciprocal_lower():
    a = RolloutCorrection(rollout_is=None, rollout_rs="token_k1", rollout_rs_threshold=2.0).rejection[0]
    assert (a.lower, a.upper) == (pytest.approx(math.log(0.5)), pytest.approx(L2))


def test_chained_rejection_is_the_and_and_removes_tokens_from_the_denominator():
    ell = [[0.05, -0.4, 0.1], [0.02, -0.01, 0.0], [0.4, 0.0, 0.0]]
    mask = [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    c = RolloutCorrection(rollout_is=None, rollout_rs="token_k2, seq_mean_k3,token_k2",
                          rollout_rs_threshold="0.05,0.03")
    assert [o.name for o in c.rejection] == ["token_k2", "seq_mean_k3"]
    out = _corr(c, ell, mask)
    # token_k2 ≤ 0.05 drops ℓ = ±0.4 (k2 = 0.08); seq_mean_k3 ≤ 0.03 keeps row 0 (≈ 0.0256), drops row 2 (≈ 0.046)
    assert out.response_mask.tolist() == [[True, False, True], [True, True, True], [False, False, False]]
    assert out.metrics["rollout_corr/rollout_rs_masked_fraction"].item() == pytest.approx(3 / 8)
    assert out.metrics["rollout_corr/rollout_rs_seq_masked_fraction"].item() == pytest.approx(2 / 3)
    lp, old, _, m, rollout = _inputs(ell, mask)
    adv = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    loss, metrics = policy_loss(lp, old, adv, m, "grpo", rollout_log_prob=rollout, rollout_correction=c)
    assert loss.item() == pytest.approx(-(1 + 1 + 2 * 3) / 5)  # ratio 1, 5 tokens left
    loss.backward()
    torch.testing.assert_close(lp.grad, -torch.tensor([[1, 0, 1], [2, 2, 2], [0, 0, 0]], dtype=D) / 5)
    assert metrics["rollout_corr/rollout_rs_token_k2_masked_fraction"] == pytest.approx(2 / 8)


# ------------------------------------------------------------------------------------------------ the loss
def test_decoupled_loss_multiplies_the_per_token_loss():
    # log π − log π_old = 0.1 on every token: PPO clip inactive (1 + 0.2 > e^0.1), loss_t = −A·e^0.1·w_t
    lp, old, adv, mask, rollout = _inputs(ELL, MASK, adv=[1.0, -2.0], lp_offset=[[0.1] * 3] * 2)
    loss, metrics = policy_loss(lp, old, adv, mask, "grpo", rollout_log_prob=rollout,
                                rollout_correction="decoupled_token_is")
    r = math.exp(0.1)
    assert loss.item() == pytest.approx(-(r * (2 + 0.6 + 1) - 2 * r * 1.5) / 4)
    loss.backward()
    torch.testing.assert_close(lp.grad, -torch.tensor([[2, 0.6, 1], [-3, 0, 0]], dtype=D) * r / 4)
    assert metrics["rollout_corr/kl"] == pytest.approx(-sum([L3, math.log(0.6), 0.0, math.log(1.5)]) / 4)
    assert "actor/pg_clipfrac" in metrics and "sampling/importance_sampling_ratio/mean" in metrics


def test_bypass_ppo_clip_anchors_at_the_rollout():
    ell = [[0.3, -0.1, 0.0], [0.05, 0.0, 0.0]]
    lp, old, adv, mask, rollout = _inputs(ell, MASK)  # log π = old: the ratio π/μ = e^ℓ
    loss, m = policy_loss(lp, old, adv, mask, "grpo", rollout_log_prob=rollout, rollout_correction="bypass_ppo_clip")
    ref, _ = policy_loss(lp, rollout, adv, mask, "grpo")
    assert loss.item() == pytest.approx(ref.item())
    assert loss.item() == pytest.approx(-(min(math.exp(0.3), 1.2) + math.exp(-0.1) + 1 + math.exp(0.05)) / 4)
    # weights are computed on sg(log π) − log μ for the metrics only
    assert m["rollout_corr/kl"] == pytest.approx(-(0.3 - 0.1 + 0.05) / 4)
    # with k3 rejection: seq_mean_k3 ≤ 0.01 rejects row 0 (k3(0.3) = 0.0499, mean ≈ 0.018)
    loss, _ = policy_loss(lp, old, adv, mask, "grpo", rollout_log_prob=rollout,
                          rollout_correction="bypass_ppo_clip_k3_rs")
    assert loss.item() == pytest.approx(-math.exp(0.05))


def test_bypass_reinforce():
    ell = [[0.3, -0.1, 0.0], [1.0, 0.0, 0.0]]
    lp, old, adv, mask, rollout = _inputs(ell, MASK, adv=[1.0, 2.0])
    loss, m = policy_loss(lp, old, adv, mask, "grpo", rollout_log_prob=rollout, rollout_correction="bypass_pg_is")
    # sequence weights on π/μ: row products e^0.2 and e^1 → min(·, 2); loss = −A·w·log π, token-mean
    w0, w1 = math.exp(0.2), 2.0
    lpv = lp.detach()
    expect = -(w0 * float(lpv[0].sum()) + 2 * w1 * float(lpv[1, 0])) / 4
    assert loss.item() == pytest.approx(expect)
    loss.backward()
    torch.testing.assert_close(lp.grad, -torch.tensor([[w0, w0, w0], [2 * w1, 0, 0]], dtype=D) / 4)


def test_trl_modes():
    ell = [[math.log(4.0), math.log(0.5), 0.0], [25.0, 0.0, 0.0]]
    w = {k: _corr(f"trl_{k}", ell, MASK).weights for k in
         ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")}
    torch.testing.assert_close(w["token_truncate"], torch.tensor([[3.0, 0.5, 1.0], [3.0, 0, 0]], dtype=D))
    torch.testing.assert_close(w["token_mask"], torch.tensor([[0.0, 0.5, 1.0], [0.0, 0, 0]], dtype=D))
    torch.testing.assert_close(w["sequence_truncate"], torch.tensor([[2.0] * 3, [3.0, 0, 0]], dtype=D))
    torch.testing.assert_close(w["sequence_mask"], torch.tensor([[2.0] * 3, [0.0, 0, 0]], dtype=D))
    m = _corr("trl_sequence_mask", ell, MASK).metrics
    assert m["sampling/importance_sampling_ratio/mean"].item() == pytest.approx(1.0)  # (2 + 0) / 2 rows
    assert m["sampling/sampling_logp_difference/max"].item() == pytest.approx(25.0)
    assert m["sampling/sampling_logp_difference/mean"].item() == pytest.approx((L2 * 3 + 25.0) / 4)
    # TRL has no clamp of ℓ: verl's token TIS at 3 would see e^20 (also truncated to 3) — the difference shows in
    # the mask modes: e^25 > 3 is zeroed
    c = RolloutCorrection(rollout_is="token", rollout_is_threshold=3.0, rollout_is_mode="truncate",
                          rollout_is_threshold_lower=0.6, safety_bound=None)
    torch.testing.assert_close(_corr(c, ell, MASK).weights, torch.tensor([[3.0, 0.6, 1.0], [3.0, 0, 0]], dtype=D))


def test_areal_decoupled():
    ell = [[math.log(6.0), math.log(0.1), 0.2], [math.log(5.0), 0.0, 0.0]]
    lp, old, adv, mask, rollout = _inputs(ell, MASK)
    out = compute_policy_loss(lp, old, adv, mask, "grpo", dual_clip=None, rollout_log_prob=rollout,
                              rollout_correction="areal_decoupled")
    torch.testing.assert_close(out.clip.per_token_loss.detach(),
                               -torch.tensor([[0.0, 0.1, math.exp(0.2)], [5.0, 0, 0]], dtype=D))
    assert out.loss.item() == pytest.approx(-(0.1 + math.exp(0.2) + 5.0) / 4)  # AReaL: original denominator


def test_cumulative_level():
    ell = [[0.04, 0.03, -0.2, 0.5], [-0.1, 0.0, 0.0, 0.0]]
    mask = [[1, 1, 1, 1], [1, 0, 0, 0]]
    out = _corr("cumulative_sqrt_t", ell, mask)
    expect = []
    for row, mrow in zip(ell, mask):
        L, t, r = 0.0, 0, []
        for x, m in zip(row, mrow):
            if m:
                L += x
                t += 1
                r.append(math.exp(min(max(L, -0.025 * math.sqrt(t)), 0.05 * math.sqrt(t))))
            else:
                r.append(0.0)
        expect.append(r)
    torch.testing.assert_close(out.weights, torch.tensor(expect, dtype=D))
    # L = 0.04, 0.07, −0.13, 0.37: inside at t = 1, 2; below at t = 3; above at t = 4; row 2: −0.1 below
    assert out.metrics["rollout_corr/rollout_is_ratio_fraction_high"].item() == pytest.approx(1 / 5)
    assert out.metrics["rollout_corr/rollout_is_ratio_fraction_low"].item() == pytest.approx(2 / 5)
    masked = _corr("cumulative_sqrt_t_mask", ell, mask).weights
    torch.testing.assert_close(masked, torch.tensor([[math.exp(0.04), math.exp(0.07), 0, 0], [0, 0, 0, 0]],
                                                    dtype=D))
    fixed = _corr("cumulative_fixed", [[0.5, 0.5, -2.0, 0.0]], [[1, 1, 1, 1]]).weights
    torch.testing.assert_close(fixed, torch.tensor([[math.exp(0.5), 2.0, 0.5, 0.5]], dtype=D))


def test_disabled_is_metrics_only():
    lp, old, adv, mask, rollout = _inputs(ELL, MASK, lp_offset=[[0.1] * 3] * 2)
    a, ma = policy_loss(lp, old, adv, mask, "grpo", rollout_log_prob=rollout, rollout_correction="disabled")
    b, mb = policy_loss(lp, old, adv, mask, "grpo", path="reference")
    assert a.item() == pytest.approx(b.item())
    assert "rollout_corr/chi2_seq" in ma and not any(k.startswith("rollout_corr/rollout_is") for k in ma)


def test_none_changes_nothing():
    lp, old, adv, mask, rollout = _inputs(ELL, MASK, lp_offset=[[0.3, -0.2, 0.1]] * 2)
    for preset in ("grpo", "ctpo", "gspo", "sapo"):
        a, ma = policy_loss(lp, old, adv, mask, preset)
        b, mb = policy_loss(lp, old, adv, mask, preset, rollout_log_prob=rollout, rollout_correction=None)
        assert a.item() == b.item() and ma == mb


def test_accepts_verl_style_mappings():
    c = ROLLOUT_CORRECTIONS["decoupled_geo_rs_token_tis"]
    d = {f: getattr(c, f) for f in ("rollout_is", "rollout_is_threshold", "rollout_rs", "rollout_rs_threshold")}
    out = _corr(d, ELL, MASK)
    torch.testing.assert_close(out.weights, _corr(c, ELL, MASK).weights)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kw, match", [
    (dict(rollout_is="tokens"), "rollout_is"),
    (dict(rollout_is_threshold="a_b"), "rollout_is_threshold"),
    (dict(rollout_is_threshold=-1.0), "rollout_is_threshold"),
    (dict(rollout_is_threshold="3_2"), "rollout_is_threshold"),
    (dict(rollout_is_threshold=True), "rollout_is_threshold"),
    (dict(rollout_rs="token_k4", rollout_rs_threshold=1.0), "rollout_rs"),
    (dict(rollout_rs="token_k2"), "rollout_rs_threshold"),
    (dict(rollout_rs="token_k2", rollout_rs_threshold="0.1_0.2"), "rollout_rs_threshold"),
    (dict(rollout_rs="token_k2,token_k3", rollout_rs_threshold="0.1,0.2,0.3"), "rollout_rs_threshold"),
    (dict(rollout_rs="seq_mean_k1", rollout_rs_threshold="2_1"), "rollout_rs_threshold"),
    (dict(loss_type="pg"), "loss_type"),
    (dict(loss_type="reinforce"), "loss_type"),
    (dict(bypass_mode=1), "bypass_mode"),
    (dict(rollout_is_batch_normalize="yes"), "rollout_is_batch_normalize"),
    (dict(rollout_is_mode="clip"), "rollout_is_mode"),
    (dict(rollout_is_threshold="0.5_2", rollout_is_threshold_lower=0.1), "rollout_is_threshold_lower"),
    (dict(rollout_is_threshold_lower=3.0), "rollout_is_threshold_lower"),
    (dict(safety_bound=0.0), "safety_bound"),
    (dict(cumulative_eps_low=math.nan), "cumulative_eps_low"),
    (dict(cumulative_exponent=math.inf), "cumulative_exponent"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        RolloutCorrection(**kw)


def test_bad_inputs():
    lp, old, adv, mask, rollout = _inputs(ELL, MASK)
    with pytest.raises(ValueError, match="rollout_correction"):
        policy_loss(lp, old, adv, mask, rollout_log_prob=rollout, rollout_correction="decoupled_tis")
    with pytest.raises(TypeError, match="rollout_correction"):
        policy_loss(lp, old, adv, mask, rollout_log_prob=rollout, rollout_correction=3)
    with pytest.raises(ValueError, match="rollout_correction"):
        policy_loss(lp, old, adv, mask, rollout_log_prob=rollout, rollout_correction={"rollout_iss": "token"})
    with pytest.raises(ValueError, match="rollout_log_prob"):
        policy_loss(lp, old, adv, mask, rollout_correction="decoupled_token_is")
    with pytest.raises(ValueError, match="rollout_log_prob"):
        policy_loss(lp, old, adv, mask, rollout_log_prob=rollout[:, :2], rollout_correction="decoupled_token_is")
    with pytest.raises(ValueError, match="rollout_log_prob"):  # checked even without a correction
        policy_loss(lp, old, adv, mask, rollout_log_prob=rollout[:1])
    with pytest.raises(TypeError, match="rollout_log_prob"):
        policy_loss(lp, old, adv, mask, rollout_log_prob=rollout.long(), rollout_correction="decoupled_token_is")
    bad = rollout.clone()
    bad[0, 1] = math.nan
    with pytest.raises(ValueError, match="rollout_log_prob: 1 NaN"):
        policy_loss(lp, old, adv, mask, rollout_log_prob=bad, rollout_correction="decoupled_token_is")
    bad_old = old.clone()
    bad_old[1, 0] = math.inf
    with pytest.raises(ValueError, match="old_log_prob"):
        policy_loss(lp, bad_old, adv, mask, rollout_log_prob=rollout, rollout_correction="decoupled_seq_is")
    with pytest.raises(ValueError, match="response_mask"):
        policy_loss(lp, old, adv, torch.zeros_like(mask), rollout_log_prob=rollout,
                    rollout_correction="decoupled_seq_is")
    # NaN on masked-out tokens is ignored
    hole = rollout.clone()
    hole[1, 2] = math.nan
    a, _ = policy_loss(lp, old, adv, mask, rollout_log_prob=hole, rollout_correction="decoupled_seq_is")
    b, _ = policy_loss(lp, old, adv, mask, rollout_log_prob=rollout, rollout_correction="decoupled_seq_is")
    assert a.item() == b.item()


def test_float32_inputs_run_in_float32():
    lp, old, adv, mask, rollout = _inputs(ELL, MASK)
    loss, m = policy_loss(lp.float(), old.float(), adv.float(), mask, "grpo", rollout_log_prob=rollout.float(),
                          rollout_correction="decoupled_geo_rs_token_tis")
    assert loss.dtype == torch.float32 and all(math.isfinite(v) for v in m.values())


# ------------------------------------------------------------------------------------------------ verl parity
@pytest.fixture(scope="module")
def verl():
    if os.environ.get("CTPO_LAB_REQUIRE_VERL"):
        import verl  # noqa: F401
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.trainer.ppo import core_algos, rollout_corr_helper
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    return RolloutCorrectionConfig, rollout_corr_helper, core_algos, FSDPActorConfig, PolicyLossConfig


VERL_PRESETS = sorted(k for k in ROLLOUT_CORRECTIONS if k.startswith(("decoupled_", "bypass_", "disabled")))
VERL_FIELDS = ("rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize", "rollout_rs",
               "rollout_rs_threshold", "bypass_mode", "loss_type")


def _batch(seed, B=7, T=19, scale=0.3, dtype=D):
    """old (π_old), rollout (μ) with mismatch noise, log π near old, per-token advantages; a mask with holes,
    right padding and one empty row."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=D) * 3
    # per-row mismatch from tiny (kept by the tight geometric-mean bands) to large (rejected, truncated)
    row_scale = torch.tensor([0.002, 0.05, 1.0, 2.0, 1.0, 0.004, 0.3], dtype=D)[:B, None]
    rollout = old + scale * row_scale * torch.randn(B, T, generator=g, dtype=D)
    lp = old + 0.1 * torch.randn(B, T, generator=g, dtype=D)
    adv = torch.randn(B, 1, generator=g, dtype=D).expand(B, T) + 0.1 * torch.randn(B, T, generator=g, dtype=D)
    mask = torch.rand(B, T, generator=g) > 0.2
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    mask &= torch.arange(T)[None, :] < lengths[:, None]
    mask[2] = False
    return lp.to(dtype), old.to(dtype), rollout.to(dtype), adv.to(dtype), mask


def _verl_call(verl, c: RolloutCorrection, lp, old, rollout, mask):
    helper = verl[1]
    train = lp if c.bypass_mode else old
    w, new_mask, metrics = helper.compute_rollout_correction_and_rejection_mask(
        old_log_prob=train.detach(), rollout_log_prob=rollout, response_mask=mask.to(lp.dtype),
        rollout_is=c.rollout_is, rollout_is_threshold=c.rollout_is_threshold,
        rollout_is_batch_normalize=c.rollout_is_batch_normalize, rollout_rs=c.rollout_rs,
        rollout_rs_threshold=c.rollout_rs_threshold)
    return (None if w is None else w.batch["rollout_is_weights"]), new_mask, metrics


def _assert_metrics(ours: dict, theirs: dict):
    ours_rc = {k: v for k, v in ours.items() if k.startswith("rollout_corr/")}
    assert set(ours_rc) == set(theirs), (set(ours_rc) ^ set(theirs))
    for k, v in theirs.items():
        assert ours_rc[k] == pytest.approx(v, rel=1e-7, abs=1e-7), k


def test_presets_equal_verl_classmethods(verl):
    RolloutCorrectionConfig = verl[0]
    for name in VERL_PRESETS:
        theirs = getattr(RolloutCorrectionConfig, name)()
        ours = ROLLOUT_CORRECTIONS[name]
        assert {f: getattr(ours, f) for f in VERL_FIELDS} == {f: getattr(theirs, f) for f in VERL_FIELDS}, name
        assert RolloutCorrection.from_verl(theirs, name=name) == ours


EXTRA = {
    "seq_icepop_bn": RolloutCorrection(rollout_is="sequence", rollout_is_threshold="0.3_3.0",
                                       rollout_is_batch_normalize=True),
    "token_bn_chain": RolloutCorrection(rollout_is="token", rollout_is_threshold=1.5, rollout_is_batch_normalize=True,
                                        rollout_rs="token_k1,seq_max_k2,seq_sum_k3",
                                        rollout_rs_threshold="0.5_1.8,0.3,2.0"),
    "rs_all": RolloutCorrection(rollout_is=None, rollout_rs=",".join(
        ("token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_mean_k2", "seq_max_k3", "seq_mean_k1")),
        rollout_rs_threshold="0.3,0.3,0.2_8.0,3.0,0.05,0.4,1.3"),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", VERL_PRESETS + sorted(EXTRA))
def test_weights_masks_metrics_match_verl(verl, name, seed):
    c = EXTRA.get(name) or ROLLOUT_CORRECTIONS[name]
    lp, old, rollout, adv, mask = _batch(seed, scale=0.4 if seed else 0.1)
    ours = compute_rollout_correction(lp, old, rollout, mask, c)
    w, new_mask, metrics = _verl_call(verl, c, lp, old, rollout, mask)
    if w is None:
        assert ours.is_weights is None
    else:
        torch.testing.assert_close(ours.is_weights, w, rtol=1e-7, atol=1e-7)
    assert torch.equal(ours.response_mask, new_mask.bool())
    _assert_metrics({k: v.item() for k, v in ours.metrics.items()}, metrics)


def _actor(verl, loss_agg_mode, correction=None):
    _, _, _, FSDPActorConfig, PolicyLossConfig = verl
    kw = {} if correction is None else dict(rollout_correction=correction)
    policy = PolicyLossConfig(loss_mode="bypass_mode" if correction is not None else "vanilla", **kw)
    return FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, policy_loss=policy,
                           loss_agg_mode=loss_agg_mode)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("name", [k for k in VERL_PRESETS if not k.startswith("bypass_")] + sorted(EXTRA))
def test_decoupled_loss_matches_verl_vanilla(verl, name, agg):
    c = EXTRA.get(name) or ROLLOUT_CORRECTIONS[name]
    core_algos = verl[2]
    lp, old, rollout, adv, mask = _batch(3, scale=0.4)
    w, new_mask, rc_metrics = _verl_call(verl, c, lp, old, rollout, mask)
    lp_v = lp.clone().requires_grad_()
    loss_v, m_v = core_algos.compute_policy_loss_vanilla(old, lp_v, adv, new_mask, loss_agg_mode=agg,
                                                         config=_actor(verl, agg), rollout_is_weights=w)
    loss_v.backward()
    lp_o = lp.clone().requires_grad_()
    loss_o, m_o = policy_loss(lp_o, old, adv, mask, "grpo", aggregation=agg, rollout_log_prob=rollout,
                              rollout_correction=c)
    loss_o.backward()
    assert loss_o.item() == pytest.approx(loss_v.item(), rel=1e-7, abs=1e-9)
    torch.testing.assert_close(lp_o.grad, lp_v.grad, rtol=1e-7, atol=1e-9)
    for k in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
        assert m_o[k] == pytest.approx(m_v[k], rel=1e-7, abs=1e-9), k
    _assert_metrics(m_o, rc_metrics)


@pytest.mark.parametrize("name", [k for k in VERL_PRESETS if k.startswith("bypass_")])
def test_bypass_loss_matches_verl(verl, name):
    RolloutCorrectionConfig, _, core_algos, _, _ = verl
    c = ROLLOUT_CORRECTIONS[name]
    lp, old, rollout, adv, mask = _batch(4, scale=0.4)
    lp = rollout + 0.02 * (lp - old)  # π_θ close to μ, so the presets' tight rejection keeps some rows
    verl_cfg = getattr(RolloutCorrectionConfig, name)()
    lp_v = lp.clone().requires_grad_()
    loss_v, m_v = core_algos.compute_policy_loss_bypass_mode(rollout, lp_v, adv, mask.to(D), "token-mean",
                                                             config=_actor(verl, "token-mean", verl_cfg))
    loss_v.backward()
    lp_o = lp.clone().requires_grad_()
    loss_o, m_o = policy_loss(lp_o, old, adv, mask, "grpo", rollout_log_prob=rollout, rollout_correction=c)
    loss_o.backward()
    assert loss_o.item() == pytest.approx(loss_v.item(), rel=1e-7, abs=1e-9)
    torch.testing.assert_close(lp_o.grad, lp_v.grad, rtol=1e-7, atol=1e-9)
    assert m_o["actor/ppo_kl"] == pytest.approx(m_v["actor/ppo_kl"], rel=1e-7, abs=1e-9)
    _assert_metrics(m_o, {k: v for k, v in m_v.items() if k.startswith("rollout_corr/")})


@pytest.mark.parametrize("name", ["decoupled_token_is", "decoupled_seq_is_rs", "decoupled_token_icepop",
                                  "decoupled_k3_rs_token_tis"])
def test_float32_matches_verl(verl, name):
    c = ROLLOUT_CORRECTIONS[name]
    core_algos = verl[2]
    lp, old, rollout, adv, mask = _batch(5, scale=0.4, dtype=torch.float32)
    w, new_mask, rc_metrics = _verl_call(verl, c, lp, old, rollout, mask)
    lp_v = lp.clone().requires_grad_()
    loss_v, _ = core_algos.compute_policy_loss_vanilla(old, lp_v, adv, new_mask, loss_agg_mode="token-mean",
                                                       config=_actor(verl, "token-mean"), rollout_is_weights=w)
    loss_v.backward()
    lp_o = lp.clone().requires_grad_()
    out = compute_policy_loss(lp_o, old, adv, mask, "grpo", rollout_log_prob=rollout, rollout_correction=c)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert torch.equal(out.mask, new_mask.bool())
    assert out.loss.item() == pytest.approx(loss_v.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(lp_o.grad, lp_v.grad, rtol=1e-5, atol=1e-6)
