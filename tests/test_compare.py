"""Aggregation of a grid of runs: curves, tables, paired tests (on synthetic run folders)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctpo_lab import compare


def _fake_grid(tmp_path, finals):
    """A grid folder whose runs log eval_accuracy 0.2 at step 0 and finals[loss][seed] at step 10."""
    losses = list(finals)
    seeds = sorted(next(iter(finals.values())))
    spec = compare.GridSpec("cpu", tuple(losses), tuple(seeds))
    (tmp_path / "grid.json").write_text(json.dumps(spec.to_dict()))
    for loss in losses:
        for seed in seeds:
            path = compare.run_dir(tmp_path, loss, seed)
            path.mkdir(parents=True)
            recs = [
                {"step": 0, "eval_accuracy": 0.2, "reward_mean": 0.1, "pg_update/clip/total/rate": 0.0},
                {"step": 5, "reward_mean": 0.3, "pg_update/clip/total/rate": 0.05, "offpolicy/kl": 0.01},
                {"step": 10, "eval_accuracy": finals[loss][seed], "reward_mean": 0.5,
                 "pg_update/clip/total/rate": 0.1, "offpolicy/kl": 0.02},
            ]
            (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
            (path / compare.FINISHED_FILE).write_text("{}")
    return spec


def test_sign_flip_p_value_is_exact():
    # all 3 differences positive: only the all-+ and all-− patterns are as extreme → 2/8
    assert compare._sign_flip_p_value(np.array([0.1, 0.2, 0.3])) == pytest.approx(0.25)
    # 5 equal positive differences → 2/32
    assert compare._sign_flip_p_value(np.full(5, 0.1)) == pytest.approx(2 / 32)
    # symmetric differences: mean 0 → p = 1
    assert compare._sign_flip_p_value(np.array([0.1, -0.1])) == pytest.approx(1.0)


def test_final_table_and_paired_comparison(tmp_path):
    finals = {"ctpo": {0: 0.6, 1: 0.7, 2: 0.8}, "grpo": {0: 0.5, 1: 0.55, 2: 0.6}}
    _fake_grid(tmp_path, finals)
    df = compare.load_grid(tmp_path)
    table = compare.final_table(df).set_index("loss")
    assert table.loc["ctpo", "final accuracy mean"] == pytest.approx(0.7)
    assert table.loc["grpo", "accuracy gain mean"] == pytest.approx(0.55 - 0.2)
    assert table.loc["ctpo", "final accuracy low"] <= 0.7 <= table.loc["ctpo", "final accuracy high"]
    # bootstrap CI of a 3-seed mean lies within the range of the seeds
    assert 0.6 - 1e-12 <= table.loc["ctpo", "final accuracy low"]
    assert table.loc["ctpo", "final accuracy high"] <= 0.8 + 1e-12
    assert table.loc["ctpo", "KL last mini-batch mean"] == pytest.approx(0.015)
    paired = compare.paired_comparison(df, "ctpo").set_index("loss")
    assert paired.loc["grpo", "mean difference"] == pytest.approx(-(0.1 + 0.15 + 0.2) / 3)
    assert paired.loc["grpo", "sign-flip p"] == pytest.approx(0.25)


def test_aggregate_writes_every_output(tmp_path):
    finals = {"grpo": {0: 0.3, 1: 0.4}, "ctpo": {0: 0.5, 1: 0.4}, "ctpo_fixed": {0: 0.45, 1: 0.35}}
    _fake_grid(tmp_path, finals)
    result = compare.aggregate(tmp_path)
    for name in ("curves.csv", "table2.csv", "table2.md", "paired.csv", "table3.csv", "table3.md", "fig2.png",
                 "fig2.pdf"):
        assert (tmp_path / name).is_file(), name
    assert set(result) == {"table2", "paired", "table3"}
    curves = compare.metric_curves(compare.load_grid(tmp_path), "eval_accuracy")
    np.testing.assert_allclose(curves["ctpo"].estimate, [0.2, 0.45])


def test_grid_spec_and_folder_protection(tmp_path):
    with pytest.raises(ValueError, match="losses"):
        compare.GridSpec(losses=("nope",))
    with pytest.raises(ValueError, match="overrides"):
        compare.GridSpec(overrides=("lr",))
    (tmp_path / "something.txt").write_text("user data")
    with pytest.raises(ValueError, match="overwrite"):
        compare.run_grid(compare.GridSpec(), tmp_path, progress=False)
    assert (tmp_path / "something.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="grid.json"):
        compare.load_grid(tmp_path)
