"""Matched-KL chain predictions for the LLM bias measurement: reference instance, enumeration, substitution."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ctpo_lab import markov
from ctpo_lab.markov.prediction import PREDICTION_ESTIMATORS, matched_chain_prediction, summarize_prediction


@pytest.mark.parametrize("automaton", ["frac", "count"])
@pytest.mark.parametrize("seed", [0, 3])
def test_kl0_instance_has_the_same_target_and_is_on_policy(automaton, seed):
    mdp = markov.random_instance(4, 6, 1, seed, kl=0.02, automaton=automaton)
    mdp0 = markov.random_instance(4, 6, 1, seed, kl=0.0, automaton=automaton)
    np.testing.assert_array_equal(mdp0.target, mdp.target)
    np.testing.assert_array_equal(mdp0.behaviour, mdp0.target)
    assert not np.allclose(mdp.behaviour, mdp.target)
    # a shorter horizon (the clipped-estimator substitution) keeps both policies
    short = markov.random_instance(4, 3, 1, seed, kl=0.02, automaton=automaton)
    np.testing.assert_array_equal(short.target, mdp.target)
    np.testing.assert_array_equal(short.behaviour, mdp.behaviour)


def test_rows_agree_with_enumeration():
    kl, T, V = 0.05, 4, 3
    df = matched_chain_prediction(kl, T, vocab_size=V, seeds=(0, 1), bin_width=None, batch_size=8)
    assert len(df) == len(PREDICTION_ESTIMATORS) * 2
    assert set(df["method"]) == {"dp"}
    for seed in (0, 1):
        mdp = markov.random_instance(V, T, 1, seed, kl=kl, automaton="frac")
        mdp0 = markov.random_instance(V, T, 1, seed, kl=0.0, automaton="frac")
        ref = markov.enumerate_moments(mdp0, "unclipped_token", "reward", markov.performance(mdp0, "target"))
        b = markov.performance(mdp, "behaviour")
        for name in PREDICTION_ESTIMATORS:
            e = markov.enumerate_moments(mdp, name, "reward", b)
            row = df[(df["estimator"] == name) & (df["seed"] == seed)].iloc[0]
            assert row["horizon"] == T
            assert row["relative_bias"] == pytest.approx(e.relative_bias, rel=1e-9, abs=1e-12)
            assert row["var_ratio"] == pytest.approx(e.trace_cov / ref.trace_cov, rel=1e-9)
            assert row["cosine"] == pytest.approx(e.cosine, rel=1e-9)
            g2 = float(e.gradient @ e.gradient)
            assert row["rel_mse"] == pytest.approx(e.mse(8) / g2, rel=1e-9)
    # the full-sequence ratio is unbiased
    assert df.loc[df["estimator"] == "unclipped_sequence", "relative_bias"].max() < 1e-9


def test_on_policy_is_unbiased_with_unit_variance_ratio():
    df = matched_chain_prediction(0.0, 6, seeds=(0, 2), clipped_max_horizon=6)
    assert len(df) == len(PREDICTION_ESTIMATORS) * 2
    np.testing.assert_allclose(df["relative_bias"], 0.0, atol=1e-9)
    np.testing.assert_allclose(df["var_ratio"], 1.0, rtol=1e-9)
    np.testing.assert_allclose(df["cosine"], 1.0, rtol=1e-9)


def test_clipped_horizon_substitution_is_recorded():
    names = ("unclipped_token", "grpo", "ctpo", "ctpo_fixed", "gspo")
    df = matched_chain_prediction(0.01, 10, estimators=names, seeds=(1,), clipped_max_horizon=4)
    hz = dict(zip(df["estimator"], df["horizon"]))
    assert hz == {"unclipped_token": 10, "grpo": 10, "ctpo": 4, "ctpo_fixed": 4, "gspo": 4}
    meth = dict(zip(df["estimator"], df["method"]))
    assert meth["unclipped_token"] == meth["grpo"] == "dp"
    assert meth["ctpo"] == "dp-binned(0.01)"
    # the substituted rows are those of the horizon-4 chain, with its own on-policy reference
    short = matched_chain_prediction(0.01, 4, estimators=("ctpo", "gspo"), seeds=(1,), clipped_max_horizon=4)
    for name in ("ctpo", "gspo"):
        a = df[df["estimator"] == name].iloc[0]
        b = short[short["estimator"] == name].iloc[0]
        for col in ("relative_bias", "var_ratio", "trace_cov", "rel_mse"):
            assert a[col] == pytest.approx(b[col], rel=1e-12)


def test_vanishing_gradient_warns():
    with pytest.warns(RuntimeWarning, match="meaningless"):
        matched_chain_prediction(0.01, 64, estimators=("unclipped_token",), seeds=(0,), automaton="count")


def test_progress_bar_runs():
    df = matched_chain_prediction(0.01, 3, estimators=("unclipped_token",), seeds=(0,), progress=True)
    assert len(df) == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"kl": -0.1}, "kl"),
    ({"kl": math.nan}, "kl"),
    ({"kl": math.inf}, "kl"),
    ({"kl": "0.1"}, "kl"),
    ({"horizon": 0}, "horizon"),
    ({"horizon": 2.5}, "horizon"),
    ({"horizon": True}, "horizon"),
    ({"estimators": ("unclipped_token", "ppo")}, "unknown preset 'ppo'.*ctpo_fixed"),
    ({"estimators": ("ctpo", "ctpo")}, "distinct"),
    ({"estimators": ()}, "estimators"),
    ({"seeds": ()}, "seeds"),
    ({"clipped_max_horizon": 0}, "clipped_max_horizon"),
    ({"batch_size": 0}, "batch_size"),
    ({"bin_width": -0.01}, "bin_width"),
])
def test_bad_inputs_raise(kwargs, match):
    args = {"kl": 0.01, "horizon": 3, "seeds": (0,), "estimators": ("unclipped_token",)} | kwargs
    with pytest.raises(ValueError, match=match):
        matched_chain_prediction(args.pop("kl"), args.pop("horizon"), **args)


def test_a_changed_preset_changes_the_prediction():
    """The prediction is about the LossConfig itself: an override of the window changes the numbers."""
    from ctpo_lab.losses import resolve_config

    wide = resolve_config("ctpo", name="ctpo_wide", eps_low=0.5, eps_high=0.5, dual_clip=None)
    df = matched_chain_prediction(0.05, 4, estimators=("ctpo", wide), seeds=(0,), bin_width=None)
    a, b = (df[df["estimator"] == n].iloc[0] for n in ("ctpo", "ctpo_wide"))
    assert abs(a["relative_bias"] - b["relative_bias"]) > 1e-3


def test_summarize_prediction():
    df = pd.DataFrame({
        "estimator": ["token", "token", "token", "ctpo"],
        "horizon": [8, 8, 8, 4],
        "relative_bias": [0.1, 0.3, 0.2, 0.5],
        "cosine": [0.9, 0.8, 1.0, 0.7],
        "var_ratio": [1.0, 2.0, 4.0, 0.5],
        "method": ["dp"] * 4,
    })
    s = summarize_prediction(df)
    assert list(s["estimator"]) == ["token", "ctpo"]
    tok = s.iloc[0]
    assert tok["relative_bias_median"] == pytest.approx(0.2)
    assert (tok["relative_bias_min"], tok["relative_bias_max"]) == (0.1, 0.3)
    assert tok["var_ratio_median"] == pytest.approx(2.0)
    assert tok["cosine_min"] == 0.8 and tok["n_seeds"] == 3
    assert s.iloc[1]["horizon"] == 4
    with pytest.raises(ValueError, match="cosine"):
        summarize_prediction(df.drop(columns="cosine"))
