"""`policy_loss` edge cases: masks exactly 0/1, NaN / non-positive hyperparameters, empty batches,
extreme log-ratios — hypothesis over random masks and values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctpo_lab.losses import PRESETS, LossConfig, compute_policy_loss, policy_loss

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _batch(B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g)
    lp = (old + 0.05 * torch.randn(B, T, generator=g)).requires_grad_()
    adv = torch.randn(B, generator=g)
    return lp, old, adv


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, math.nan, math.inf])
def test_mask_values_other_than_0_and_1_are_refused(bad):
    lp, old, adv = _batch()
    mask = torch.ones(2, 5)
    mask[1, 3] = bad
    with pytest.raises(ValueError, match="^response_mask: "):
        policy_loss(lp, old, adv, mask, preset="ctpo")
    with pytest.raises(ValueError, match="^response_mask: "):
        policy_loss(lp, old, adv, mask.to(torch.int64) if math.isfinite(bad) and bad == int(bad) else mask)


def test_integer_and_float_01_masks_equal_the_bool_mask():
    lp, old, adv = _batch()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ref, ref_m = policy_loss(lp, old, adv, mask, preset="ctpo")
    for m in (mask.to(torch.int64), mask.to(torch.float32), mask.to(torch.uint8)):
        loss, metrics = policy_loss(lp, old, adv, m, preset="ctpo")
        assert torch.equal(loss, ref) and metrics == ref_m


@pytest.mark.parametrize("field", ["eps_low", "eps_high", "clip_exponent", "dual_clip", "log_ratio_clamp",
                                   "max_log_weight", "truncation"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_hyperparameters_are_refused(field, value):
    base = PRESETS["cumulative_tis"] if field == "truncation" else PRESETS["ctpo"]
    with pytest.raises(ValueError, match=f"^{field}: "):
        LossConfig(**{**base.__dict__, field: value})


@pytest.mark.parametrize("value", [-1.0, 0.0])
def test_non_positive_log_ratio_clamp_is_refused(value):
    with pytest.raises(ValueError, match="^log_ratio_clamp: "):
        LossConfig(**{**PRESETS["grpo"].__dict__, "log_ratio_clamp": value})
    lp, old, adv = _batch()
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        policy_loss(lp, old, adv, torch.ones(2, 5, dtype=torch.bool), preset="grpo", log_ratio_clamp=value)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
@pytest.mark.parametrize("name", ["grpo", "gspo", "ctpo", "ctpo_fixed", "unclipped_sequence", "cispo"])
def test_empty_batch_is_a_zero_loss_with_zero_gradient_and_zero_metrics(shape, name):
    lp = torch.zeros(shape, requires_grad=True)
    loss, metrics = policy_loss(lp, torch.zeros(shape), torch.zeros(shape[0]), torch.ones(shape, dtype=torch.bool),
                                preset=name)
    loss.backward()
    assert loss.item() == 0 and lp.grad.shape == shape and not lp.grad.any()
    assert metrics and all(v == 0 for v in metrics.values()), metrics


def test_empty_mask_metrics_are_zero_not_nan():
    lp, old, adv = _batch()
    loss, metrics = policy_loss(lp, old, adv, torch.zeros(2, 5, dtype=torch.bool), preset="ctpo")
    assert loss.item() == 0
    for key in ("pg_update/ess/token", "pg_update/ess/sequence", "pg_update/is_ratio/p50", "pg_update/is_ratio/p99",
                "pg_update/is_ratio/min", "pg_update/is_ratio/max", "pg_update/log_weight/max"):
        assert metrics[key] == 0, key


@pytest.mark.parametrize("name", ["grpo", "ctpo", "unclipped_token", "gspo"])
def test_log_ratio_50_without_clamp_gives_no_nan_metric(name):
    lp = torch.full((2, 4), 50.0, requires_grad=True)
    _, metrics = policy_loss(lp, torch.zeros(2, 4), torch.ones(2), torch.ones(2, 4, dtype=torch.bool), preset=name,
                             log_ratio_clamp=None)
    bad = [k for k, v in metrics.items() if math.isnan(v)]
    assert not bad, bad
    assert metrics["pg_update/is_ratio/p50"] >= math.exp(10) * 0.99  # e^50 (e^10 under a cap of 10), not NaN


def test_an_overflowing_loss_from_finite_inputs_is_an_error():
    lp = torch.full((2, 4), 50.0, requires_grad=True)
    with pytest.raises(ValueError, match="^max_log_weight: .*overflow"):
        policy_loss(lp, torch.zeros(2, 4), torch.ones(2), torch.ones(2, 4, dtype=torch.bool),
                    preset="unclipped_cumulative", log_ratio_clamp=None)
    loss, _ = policy_loss(lp, torch.zeros(2, 4), torch.ones(2), torch.ones(2, 4, dtype=torch.bool),
                          preset="unclipped_cumulative", log_ratio_clamp=None, max_log_weight=10.0)
    assert math.isfinite(loss.item())


@st.composite
def batches(draw):
    B = draw(st.integers(0, 4))
    T = draw(st.integers(0, 12))
    n = B * T
    floats = st.floats(-60.0, 60.0, allow_nan=False, width=32)
    ell = torch.tensor(draw(st.lists(floats, min_size=n, max_size=n)), dtype=torch.float32).reshape(B, T)
    old = torch.tensor(draw(st.lists(st.floats(-30.0, 0.0, width=32), min_size=n, max_size=n)),
                       dtype=torch.float32).reshape(B, T)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(B, T)
    adv = torch.tensor(draw(st.lists(st.floats(-5.0, 5.0, width=32), min_size=B, max_size=B)), dtype=torch.float32)
    kind = draw(st.sampled_from(["bool", "int", "float"]))
    m = {"bool": mask, "int": mask.to(torch.int64), "float": mask.to(torch.float32)}[kind]
    return old + ell, old, adv, m


@SETTINGS
@given(batches(), st.sampled_from(sorted(PRESETS)), st.sampled_from([None, 20.0]))
def test_finite_inputs_give_finite_metrics_or_a_clear_error(batch, name, clamp):
    lp, old, adv, mask = batch
    lp = lp.clone().requires_grad_()
    try:
        loss, metrics = policy_loss(lp, old, adv, mask, preset=name, log_ratio_clamp=clamp)
    except ValueError as e:  # only the documented overflow of an uncapped weight
        assert str(e).startswith("max_log_weight: ") and "overflow" in str(e)
        return
    assert math.isfinite(loss.item())
    nan = [k for k, v in metrics.items() if math.isnan(v)]
    assert not nan, (name, nan)
    loss.backward()
    if not mask.bool().any():
        assert loss.item() == 0 and not lp.grad.any()
    assert not lp.grad[~mask.bool()].any()  # masked-out tokens get no gradient


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 6), st.sampled_from([0.5, 2.0, -1.0, 3.0, 0.999]))
def test_random_masks_with_one_bad_value_are_refused(B, T, bad):
    lp, old, adv = _batch(B, T)
    mask = torch.ones(B, T)
    mask[B - 1, T - 1] = bad
    with pytest.raises(ValueError, match="^response_mask: "):
        compute_policy_loss(lp, old, adv, mask, preset="grpo")
