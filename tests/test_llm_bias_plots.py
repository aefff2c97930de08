"""Figures of the LLM bias/variance measurement, on synthetic tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ctpo_lab.llm.bias import ESTIMATORS
from ctpo_lab.llm.bias_plots import estimator_marker, plot_bias_variance, plot_ratio_profiles
from ctpo_lab.style import ESTIMATOR_COLORS, estimator_color, estimator_label

SOURCES = ("stale_k1", "stale_k4", "stale_k15", "temperature", "dtype")


def _table(sources=SOURCES, estimators=ESTIMATORS, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i, src in enumerate(sources):
        for est in estimators:
            b, v = rng.uniform(0.01, 0.8), math.exp(rng.normal(0, 1))
            rows.append({"source": src, "estimator": est, "rel_bias": b, "rel_bias_lo": b * 0.7,
                         "rel_bias_hi": b * 1.4, "var_ratio": v, "var_ratio_lo": v * 0.8, "var_ratio_hi": v * 1.3,
                         "mean_kl": 1e-3 * (i + 1), "n": 512, "note": "ignored"})
    return pd.DataFrame(rows)


def _prediction(table: pd.DataFrame) -> pd.DataFrame:
    p = table[["source", "estimator"]].copy()
    p["relative_bias_median"] = table["rel_bias"].to_numpy() * 1.1
    p["relative_bias_min"] = p["relative_bias_median"] * 0.5
    p["relative_bias_max"] = p["relative_bias_median"] * 2.0
    p["var_ratio_median"] = table["var_ratio"].to_numpy() * 0.9
    p["var_ratio_min"] = p["var_ratio_median"] * 0.5
    p["var_ratio_max"] = p["var_ratio_median"] * 1.5
    return p


def _check_files(paths, stem):
    assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.pdf"]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"


def test_bias_variance_with_prediction(tmp_path):
    t = _table()
    paths = plot_bias_variance(t, _prediction(t), tmp_path / "figs")
    _check_files(paths, "bias_variance")


def test_bias_variance_nan_rows_and_empty_panel(tmp_path):
    t = _table(sources=("stale_k1", "temperature", "dtype", "a", "b", "c"))  # two rows of panels
    t.loc[t["estimator"] == "unclipped_token", ["rel_bias_lo", "rel_bias_hi"]] = np.nan  # no vertical bar
    t.loc[t["estimator"] == "unclipped_sequence_geomean", ["var_ratio_lo", "var_ratio_hi"]] = np.nan  # no x bar
    t.loc[t["estimator"] == "unclipped_sequence", "var_ratio_lo"] = 0.0  # interval touching 0 on the log axis
    t.loc[t["source"] == "dtype", ["rel_bias", "var_ratio"]] = np.nan  # an all-NaN panel: "no data"
    t.loc[t["source"] == "temperature", "mean_kl"] = np.nan
    p = _prediction(t)
    p.loc[p["estimator"] == "unclipped_cumulative", ["var_ratio_min", "var_ratio_max"]] = np.nan
    paths = plot_bias_variance(t, p, tmp_path, name="nan_case")
    _check_files(paths, "nan_case")
    # without a prediction, and a table without the optional interval / KL columns
    paths = plot_bias_variance(t[["source", "estimator", "rel_bias", "var_ratio"]], None, tmp_path, name="bare")
    _check_files(paths, "bare")


def test_unknown_estimator_gets_fallback_style(tmp_path):
    t = _table(sources=("stale_k1",), estimators=("unclipped_token", "my_new_estimator"))
    assert estimator_color("my_new_estimator") == "#333333"
    assert estimator_marker("my_new_estimator") == estimator_marker("my_new_estimator")
    # a bare weight and its canonical clipped loss: same colour, different marker
    for bare, clipped in (("unclipped_token", "grpo"), ("unclipped_cumulative", "ctpo"),
                          ("unclipped_sequence_geomean", "gspo")):
        assert estimator_color(bare) == estimator_color(clipped)
        assert estimator_marker(bare) != estimator_marker(clipped)
    _check_files(plot_bias_variance(t, None, tmp_path), "bias_variance")


def test_every_default_estimator_and_profile_weight_has_a_style():
    for est in ESTIMATORS:
        assert est in ESTIMATOR_COLORS and estimator_label(est) != est, est
    for w in ("cumulative", "token", "sequence_geomean"):
        assert w in ESTIMATOR_COLORS, w
    markers = [estimator_marker(e) for e in ESTIMATORS]
    colours = [estimator_color(e) for e in ESTIMATORS]
    assert len(set(zip(colours, markers))) == len(ESTIMATORS)  # every estimator is distinguishable


def test_bias_variance_bad_inputs(tmp_path):
    t = _table(sources=("stale_k1",))
    with pytest.raises(ValueError, match="table lacks columns.*var_ratio"):
        plot_bias_variance(t.drop(columns="var_ratio"), None, tmp_path)
    with pytest.raises(ValueError, match="prediction lacks columns"):
        plot_bias_variance(t, t, tmp_path)
    with pytest.raises(ValueError, match="table must be a pandas DataFrame"):
        plot_bias_variance(t.to_dict(), None, tmp_path)
    with pytest.raises(ValueError, match="table has no rows"):
        plot_bias_variance(t.iloc[:0], None, tmp_path)
    with pytest.raises(ValueError, match="name"):
        plot_bias_variance(t, None, tmp_path, name="a/b")


def _profile() -> pd.DataFrame:
    rows = []
    for src, kl in (("stale_k1", 0.001), ("temperature", 0.01)):
        for w in ("cumulative", "token", "sequence_geomean"):
            for t in range(1, 65):
                grow = math.exp(kl * t) if w == "cumulative" else 1.0 + kl
                m = 1.0 + 0.01 * math.sin(t) * (t if w == "cumulative" else 1)
                rows.append({"source": src, "weight": w, "position": t, "mean": m, "mean_lo": m - 0.05,
                             "mean_hi": m + 0.05, "var": grow - 1, "ess": 1 / grow, "n": 256})
    return pd.DataFrame(rows)


def test_ratio_profiles(tmp_path):
    _check_files(plot_ratio_profiles(_profile(), tmp_path), "ratio_profiles")


def test_ratio_profiles_nan_and_unknown_weight(tmp_path):
    p = _profile()
    p.loc[p["position"] > 40, ["mean_lo", "mean_hi"]] = np.nan
    p.loc[p["source"] == "temperature", ["mean", "ess"]] = np.nan  # all-NaN column: "no data"
    p.loc[p["weight"] == "sequence_geomean", "weight"] = "other_weight"
    _check_files(plot_ratio_profiles(p.drop(columns=["var", "n"]), tmp_path, name="rp"), "rp")
    with pytest.raises(ValueError, match="profile lacks columns.*ess"):
        plot_ratio_profiles(p.drop(columns="ess"), tmp_path)
