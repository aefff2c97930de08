"""diagnose's clip rates (every preset, from the loss's own gradient), the calibration of thresholds to a target
clip rate, the recommendation's choice of window on runs of known growth, and the chain prediction's wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctpo_lab import losses
from ctpo_lab.diagnose import clip, pipeline, readers


def _run(n: int = 64, t: int = 80, sigma: float = 0.3, seed: int = 0, advantages: bool = True,
         telescoping: bool = False):
    """Random-walk log-ratios (sd L_t = σ√t), or telescoping ones ℓ_t = x_t − x_{t−1} (sd L_t constant)."""
    rng = np.random.default_rng(seed)
    if telescoping:
        x = sigma * rng.standard_normal((n, t + 1))
        ell = np.diff(x, axis=1)
    else:
        ell = -0.5 * sigma**2 + sigma * rng.standard_normal((n, t))
    mask = np.arange(t)[None, :] < rng.integers(t // 2, t + 1, n)[:, None]
    adv = rng.choice([-1.5, -1.0, 0.0, 1.0, 2.0], size=n) if advantages else None
    return np.where(mask, ell, 0.0), mask, adv, np.arange(n) // 4


def _lean_dropped(ell, mask, adv, preset, **overrides) -> np.ndarray:
    """Valid tokens with A ≠ 0 whose gradient policy_loss's default (lean) path sets to zero."""
    lp = torch.tensor(ell, dtype=torch.float64, requires_grad=True)
    a = torch.as_tensor(np.asarray(adv, dtype=np.float64))
    loss, _ = losses.policy_loss(lp, torch.zeros_like(lp), a, torch.as_tensor(mask), preset, **overrides)
    if loss.requires_grad:
        loss.backward()
    grad = np.zeros(ell.shape) if lp.grad is None else lp.grad.numpy()
    a2 = np.broadcast_to(np.asarray(adv)[:, None], mask.shape) if np.ndim(adv) == 1 else np.asarray(adv)
    return mask & (a2 != 0) & (grad == 0)


def _rate(d, mask, adv):
    a2 = np.broadcast_to(np.asarray(adv)[:, None], mask.shape)
    return d.sum() / (mask & (a2 != 0)).sum()


def test_clip_rates_equal_policy_loss_gradient_mask_for_every_preset():
    ell, mask, adv, _ = _run()
    rates = clip.clip_rates(ell, mask, adv, list(losses.PRESETS))
    assert set(rates["overall"]) == set(losses.PRESETS)
    some_clip = 0
    for name in losses.PRESETS:
        want = _lean_dropped(ell, mask, adv, name)
        np.testing.assert_array_equal(clip.dropped_mask(ell, mask, adv, name), want, err_msg=name)
        assert rates["overall"][name] == pytest.approx(_rate(want, mask, adv), abs=1e-12), name
        some_clip += want.any()
    assert some_clip >= 5  # the data exercise the clips (σ = 0.3 per token)


def test_per_sign_rates_without_advantages():
    ell, mask, _, _ = _run(advantages=False)
    rates = clip.clip_rates(ell, mask, None, ["grpo", "ctpo", "unclipped_token"])
    n = mask.shape[0]
    for name in ("grpo", "ctpo", "unclipped_token"):
        for sign, key in ((1.0, "positive"), (-1.0, "negative")):
            want = _lean_dropped(ell, mask, np.full(n, sign), name)
            assert rates["overall"][name][key] == pytest.approx(want.sum() / mask.sum(), abs=1e-12)
    assert rates["overall"]["grpo"]["positive"] != rates["overall"]["grpo"]["negative"]


def test_by_position_rates_pool_to_the_overall_rate():
    ell, mask, adv, _ = _run(t=120)
    rates = clip.clip_rates(ell, mask, adv, ["ctpo", "grpo"], bin_width=20)
    a2 = np.broadcast_to(adv[:, None], mask.shape)
    active = mask & (a2 != 0)
    pos = np.cumsum(mask, axis=1)
    for name in ("ctpo", "grpo"):
        d = _lean_dropped(ell, mask, adv, name)
        by_bin = rates["by_bin"][name]
        assert len(by_bin) == len(rates["bin_center"])
        counts = [int((active & (pos > 20 * b) & (pos <= 20 * (b + 1))).sum()) for b in range(len(by_bin))]
        drops = [int((d & (pos > 20 * b) & (pos <= 20 * (b + 1))).sum()) for b in range(len(by_bin))]
        pooled = sum(r * c for r, c in zip(by_bin, counts) if r is not None) / sum(counts)
        assert pooled == pytest.approx(sum(drops) / sum(counts), rel=1e-9)


def test_a_preset_added_later_is_covered(monkeypatch):
    tight = losses.LossConfig(name="grpo_tight", ratio="token", clip="ppo", eps_low=0.01, eps_high=0.01)
    monkeypatch.setitem(losses.PRESETS, "grpo_tight", tight)
    ell, mask, adv, gid = _run()
    s = pipeline.summarize(readers.Trajectories(ell, mask, adv, gid, None, "parquet"), n_boot=20, chain_seeds=0)
    want = _lean_dropped(ell, mask, adv, tight)
    assert s["clip_rate"]["grpo_tight"] == pytest.approx(_rate(want, mask, adv), abs=1e-12)
    assert s["clip_rate"]["grpo_tight"] > s["clip_rate"]["grpo"]


@pytest.mark.parametrize("preset", ["grpo", "ctpo"])
def test_calibration_reaches_the_target_and_is_the_loss_own_rate(preset):
    ell, mask, adv, _ = _run(n=96)
    target = 0.01
    cal = clip.calibrate(ell, mask, adv, preset, target, max_rows=mask.shape[0])
    assert cal is not None and cal["reached"]
    assert abs(cal["clip_rate"] - target) <= 0.5 * target
    fields = {k: cal[k] for k in ("eps_low", "eps_high", "dual_clip") if k in cal}
    assert cal["clip_rate"] == pytest.approx(_rate(_lean_dropped(ell, mask, adv, preset, **fields), mask, adv))
    assert cal["clip_rate_default"] == pytest.approx(_rate(_lean_dropped(ell, mask, adv, preset), mask, adv))


def test_calibration_is_none_for_a_clip_that_never_drops():
    ell, mask, adv, _ = _run()
    assert clip.calibrate(ell, mask, adv, "cispo", 0.01) is None
    assert clip.calibrate(ell, mask, adv, "unclipped_cumulative", 0.01) is None


@pytest.mark.parametrize("telescoping, preset", [(False, "ctpo"), (True, "ctpo_fixed")])
def test_recommendation_follows_the_growth_of_sd_L(telescoping, preset):
    ell, mask, adv, gid = _run(n=200, t=150, sigma=0.05, telescoping=telescoping, seed=3)
    s = pipeline.summarize(readers.Trajectories(ell, mask, adv, gid, None, "parquet"), n_boot=100, chain_seeds=0,
                           target_clip_rate=0.005)
    rec = s["recommendation"]
    assert rec["preset"] == preset and rec["reasons"]
    th = rec["thresholds"]
    assert th is not None and abs(th["clip_rate"] - 0.005) <= 0.5 * 0.005
    assert set(rec["calibrated"]) == set(losses.TRAINING_PRESETS)


def test_chain_prediction_is_the_lab_at_the_run_kl_and_length():
    from ctpo_lab.markov import matched_chain_prediction

    got = pipeline.chain_prediction(0.002, 40.4, seeds=1, seed=2)
    assert got["horizon"] == 40 and set(got["estimators"]) == set(losses.PRESETS)
    ref = matched_chain_prediction(0.002, 40, estimators=["grpo", "ctpo"], seeds=(2,), clipped_max_horizon=8)
    for name in ("grpo", "ctpo"):
        row = ref[ref["estimator"] == name].iloc[0]
        assert got["estimators"][name]["relative_bias"] == pytest.approx(row["relative_bias"])
        assert got["estimators"][name]["horizon"] == row["horizon"]
    assert pipeline.chain_prediction(0.002, 40, seeds=0) is None
