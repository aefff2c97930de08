"""Markov lab: the command line."""

from __future__ import annotations

import pandas as pd
import pytest

from ctpo_lab.markov.__main__ import main


def test_refuses_to_overwrite_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["--out", str(tmp_path), "--quick"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "user data"


@pytest.mark.slow
def test_quick_study_writes_outputs(tmp_path):
    out = tmp_path / "study"
    assert main(["--out", str(out), "--quick", "--seed", "0"]) == 0
    for name in ("reproductions.csv", "sweep.csv", "profiles.csv", "clip_profiles.csv",
                 "bias_variance_vs_T.png", "bias_variance_vs_T.pdf", "variance_ratio.png", "position_profiles.pdf"):
        assert (out / name).exists(), name
    rep = pd.read_csv(out / "reproductions.csv")
    assert list(rep.columns[:4]) == ["fact", "value", "expected", "holds"]
    sweep = pd.read_csv(out / "sweep.csv")
    assert {"T", "kl", "estimator", "signal", "relative_bias", "trace_cov", "mse_N64"} <= set(sweep.columns)
