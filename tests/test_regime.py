"""The regime map (`python -m ctpo_lab.train regime`): a micro study end to end, the paired p-values, resume,
cells needing a config field the trainer lacks, the figure family and the CLI contract."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ctpo_lab import compare
from ctpo_lab.train import regime


def _brute_force_p(d: np.ndarray) -> float:
    """Two-sided sign-flip p by enumerating every sign pattern."""
    observed = abs(d.mean())
    hits = sum(abs(np.mean(np.array(signs) * d)) >= observed - 1e-12
               for signs in itertools.product((-1.0, 1.0), repeat=d.size))
    return hits / 2 ** d.size


@pytest.fixture(scope="module")
def micro(tiny_regime_study):
    """2 cells × 2 losses × 2 seeds of cpu-tiny-sized runs, plus the cell ``needs-missing`` that needs a config
    field the trainer lacks (defined and run once per session in conftest.py)."""
    return tiny_regime_study


def test_micro_study_writes_the_map(micro):
    out, result = micro
    m = pd.read_csv(out / "regime_map.csv")
    assert tuple(m.columns) == regime.MAP_COLUMNS
    assert len(m) == 4 and set(m["loss"]) == {"grpo", "ctpo"} and (m["seeds"] == 2).all()
    assert set(m["updates_per_rollout"]) == {1, 4}
    assert (m["ci_low"] <= m["final_accuracy"] + 1e-12).all() and (m["final_accuracy"] <= m["ci_high"] + 1e-12).all()
    assert m[m["loss"] == "grpo"]["p_vs_grpo"].isna().all()
    runs = pd.read_csv(out / "regime_runs.csv")
    assert len(runs) == 8
    for col in ("final_accuracy", "auc_accuracy", "collapsed", "clip_fraction", "kl", "response_tokens"):
        assert col in runs
    assert np.isfinite(runs["kl"]).all()
    # p_vs_grpo is the exact sign-flip p of the seed-paired differences
    for cell in ("short-u1-k0-same", "short-u4-k0-same"):
        r = runs[runs["cell"] == cell].pivot(index="seed", columns="loss", values="final_accuracy")
        p = m[(m["cell"] == cell) & (m["loss"] == "ctpo")]["p_vs_grpo"].iloc[0]
        assert p == pytest.approx(_brute_force_p((r["ctpo"] - r["grpo"]).to_numpy()))
    detail = pd.read_csv(out / "regime_map_detail.csv")
    assert {"auc_accuracy", "clip_fraction", "kl_per_token", "predicted_relative_bias"} <= set(detail.columns)


def test_cell_with_a_missing_field_is_skipped(micro, capsys):
    out, result = micro
    assert "no_such_field" in result["skipped"]["needs-missing"]
    assert not (out / "cells" / "needs-missing").exists()
    assert "needs-missing" not in set(pd.read_csv(out / "regime_map.csv")["cell"])
    assert regime.missing_fields(["no_such_field=1", "lr=1e-3", "task_options.digits=1"]) == ["no_such_field"]


def test_resume_reuses_finished_runs(micro, capsys):
    out, _ = micro
    logs = sorted(out.glob("cells/*/runs/*/metrics.jsonl"))
    assert len(logs) == 8
    before = {p: p.stat().st_mtime_ns for p in logs}
    with pytest.raises(ValueError, match="--resume"):
        regime.run_study(out, preset="tiny", seeds=(0, 1), progress=False)
    capsys.readouterr()
    result = regime.run_study(out, preset="tiny", seeds=(0, 1), resume=True, progress=True)
    err = capsys.readouterr().err
    assert err.count("4 finished run(s) reused, 0 to run") == 2
    assert {p: p.stat().st_mtime_ns for p in logs} == before
    assert len(result["map"]) == 4
    with pytest.raises(ValueError, match="seeds"):  # another study in the same folder
        regime.run_study(out, preset="tiny", seeds=(0, 1, 2), resume=True, progress=False)


def _synthetic_study(root, finals: dict[str, list[float]], cell: str = "short-u16-k0-same"):
    """A study folder whose runs log accuracy 0.2 at step 0 and finals[loss][seed] at step 10."""
    seeds = list(range(len(next(iter(finals.values())))))
    info = {"name": cell, "updates_per_rollout": 16, "staleness": 0, "length": "short", "sampler": "same",
            "extra": []}
    spec = {"preset": "cpu", "study": regime.STUDY_PRESETS["cpu"].to_dict(), "losses": list(finals),
            "seeds": seeds, "cells": {cell: info}}
    root.mkdir(parents=True)
    (root / regime.STUDY_FILE).write_text(json.dumps(spec))
    for loss, values in finals.items():
        for seed, final in zip(seeds, values):
            path = compare.run_dir(root / "cells" / cell, loss, seed)
            path.mkdir(parents=True)
            best = 0.9 if (loss == "ctpo" and seed == 0) else 0.2  # ctpo seed 0 collapses from 0.9
            recs = [{"step": 0, "eval_accuracy": 0.2},
                    {"step": 5, "eval_accuracy": best, "pg_update/clip/total/rate": 0.1, "offpolicy/kl_k3": 0.004,
                     "response_length/mean": 8.0, "train/nan_updates": int(loss == "ctpo" and seed == 1)},
                    {"step": 10, "eval_accuracy": final, "pg_update/clip/total/rate": 0.3,
                     "offpolicy/kl_k3": 0.006, "response_length/mean": 10.0, "train/nan_updates": 0}]
            (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
            (path / compare.FINISHED_FILE).write_text(json.dumps({"steps": 10, "wall_time": 1.0}))
    return root


def test_p_values_and_outcomes_on_a_synthetic_study(tmp_path):
    rng = np.random.default_rng(3)
    finals = {"grpo": list(rng.uniform(0.3, 0.6, 8)), "ctpo": list(rng.uniform(0.4, 0.7, 8)),
              "gspo": list(rng.uniform(0.3, 0.6, 8))}
    finals["cispo"] = [g + 0.05 for g in finals["grpo"]]  # always better: p = 2/2^8
    study = _synthetic_study(tmp_path / "study", finals)
    result = regime.summarize_study(study, prediction=False)
    m = result["map"].set_index("loss")
    for loss in ("ctpo", "gspo", "cispo"):
        d = np.array(finals[loss]) - np.array(finals["grpo"])
        assert m.loc[loss, "p_vs_grpo"] == pytest.approx(_brute_force_p(d))
        assert m.loc[loss, "final_accuracy"] == pytest.approx(np.mean(finals[loss]))
    assert m.loc["cispo", "p_vs_grpo"] == pytest.approx(2 / 256)
    assert m.loc["grpo", "response_tokens"] == pytest.approx(9.0)
    runs = result["runs"].set_index(["loss", "seed"])
    assert bool(runs.loc[("ctpo", 1), "collapsed"])  # a non-finite update
    assert bool(runs.loc[("ctpo", 0), "collapsed"]) == (0.9 - finals["ctpo"][0] >= 0.2)
    assert not runs.loc[("grpo", 2), "collapsed"]
    assert runs.loc[("grpo", 0), "clip_fraction"] == pytest.approx(0.2)
    assert runs.loc[("grpo", 0), "auc_accuracy"] == pytest.approx((0.2 + finals["grpo"][0]) / 4 + 0.1)


def test_regime_figure_family(tmp_path):
    from ctpo_lab.figures import regime_figs
    from ctpo_lab.figures.common import apply_style

    apply_style()
    finals = {"grpo": [0.3, 0.4, 0.5], "ctpo": [0.5, 0.6, 0.7]}
    study = _synthetic_study(tmp_path / "study", finals)
    files = regime_figs.make(tmp_path / "figs", quick=False, seed=0, cache=tmp_path / "cache", command="test",
                             study_dir=study)
    names = {p.name for p in files}
    assert {"regime_map.csv", "regime_map.png", "regime_map_detail.csv"} <= names
    m = pd.read_csv(tmp_path / "figs" / "regime_map.csv")
    assert tuple(m.columns) == regime.MAP_COLUMNS
    detail = pd.read_csv(tmp_path / "figs" / "regime_map_detail.csv")
    assert np.isfinite(detail["predicted_relative_bias"]).all()  # the exact chain at KL 0.005, T = 9
    with pytest.raises(ValueError, match="no regime study"):
        regime_figs.make(tmp_path / "figs", quick=False, seed=0, cache=tmp_path / "cache", command="test",
                         study_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("argv, flag", [
    (["--cells", "nope"], "--cells"),
    (["--losses", "nope"], "--losses"),
    (["--losses", "ctpo", "gspo"], "--losses"),
    (["--seeds", "1"], "--seeds"),
    (["--workers", "0"], "--workers"),
    (["--preset", "nope"], "--preset"),
    (["--resume", "--overwrite"], "--overwrite"),
    (["--bogus"], ""),
])
def test_cli_errors_are_one_line_exit_2(argv, flag, tmp_path, capsys):
    rc = regime.main(["--preset", "tiny", "--out", str(tmp_path / "s"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and flag in err[0]
    assert not (tmp_path / "s").exists()


def test_cli_dispatch_and_list():
    p = subprocess.run([sys.executable, "-m", "ctpo_lab.train", "regime", "--list"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "short-u16-k0-same" in p.stdout and "long-u16-k0-same" in p.stdout
    p = subprocess.run([sys.executable, "-m", "ctpo_lab.train", "regime", "--cells", "nope"], capture_output=True,
                       text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: --cells")
