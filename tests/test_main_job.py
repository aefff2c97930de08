"""The main job: its grid is the regime study's cell, Holm's correction, the verdict rule, a tiny end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ctpo_lab import machine, stats
from ctpo_lab.train import main_job, regime


def _holm_brute(p: np.ndarray) -> np.ndarray:
    """Holm by its definition: reject H_(i) at level a iff p_(j) ≤ a / (m − j + 1) for every j ≤ i; the
    adjusted p-value is the smallest such a (searched on a fine grid of candidate levels)."""
    m = p.size
    order = np.argsort(p)
    out = np.empty(m)
    for rank, i in enumerate(order):
        candidates = sorted({min(1.0, (m - j) * p[order[j]]) for j in range(m)} | {1.0})
        for a in candidates:
            if all(p[order[j]] <= a / (m - j) + 1e-15 for j in range(rank + 1)):
                out[i] = a
                break
    return out


@pytest.mark.parametrize("seed", range(5))
def test_holm_matches_its_definition(seed):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 0.2, size=rng.integers(1, 7))
    np.testing.assert_allclose(stats.holm_adjust(p), _holm_brute(p), rtol=0, atol=1e-12)


def test_holm_known_values_and_nan():
    got = stats.holm_adjust(np.array([0.01, 0.04, 0.03, np.nan, 0.5]))
    np.testing.assert_allclose(got[[0, 1, 2, 4]], [0.04, 0.09, 0.09, 0.5])
    assert np.isnan(got[3])
    assert np.isnan(stats.holm_adjust(np.array([np.nan]))).all()


def _paired_row(loss: str, diffs: np.ndarray) -> dict:
    ci = stats.bootstrap_ci(diffs, n_boot=4000, seed=0)
    return {"loss": loss, "reference": "grpo", "paired seeds": diffs.size, "mean difference": ci.estimate,
            "CI low": ci.low, "CI high": ci.high, "sign-flip p": stats.sign_flip_p_value(diffs)}


def test_verdict_rule():
    rng = np.random.default_rng(0)
    big = 0.05 + 0.01 * rng.standard_normal(12)  # every seed above: p = 2/4096
    noise = 0.02 * rng.standard_normal(12)
    # 10 of 12 seeds above, modest: raw p < 0.05, but not after the correction for 3 comparisons
    edge = np.array([0.01] * 10 + [-0.012, -0.012])
    table = main_job.verdict(pd.DataFrame([_paired_row("a", -big), _paired_row("b", noise),
                                           _paired_row("c", edge)]))
    assert table["sign-flip p"].iloc[2] < 0.05 <= table["holm p"].iloc[2]
    assert list(table["verdict"]) == ["separated", "not separated", "borderline"]
    np.testing.assert_allclose(table["holm p"], stats.holm_adjust(table["sign-flip p"].to_numpy()))
    lines = main_job.format_verdict(table)
    assert lines[0].startswith("a is below grpo") and "borderline" in lines[2] and "not separated" in lines[1]


def test_verdict_needs_ci_excluding_zero():
    row = {"loss": "x", "reference": "grpo", "paired seeds": 12, "mean difference": 0.01, "CI low": -0.001,
           "CI high": 0.02, "sign-flip p": 0.001}
    assert main_job.verdict(pd.DataFrame([row]))["verdict"].iloc[0] == "borderline"


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1, float("nan")])
def test_verdict_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        main_job.verdict(pd.DataFrame([_paired_row("a", np.ones(3))]), alpha=alpha)


def test_main_job_grid_is_the_study_cell():
    spec = main_job.main_job_spec()
    study = regime.STUDY_PRESETS[main_job.MAIN_JOB.study]
    cell = study.cell(main_job.MAIN_JOB.cell)
    assert spec.overrides[:len(cell.overrides(study))] == cell.overrides(study) and spec.steps == study.steps
    assert spec.train_preset == study.train_preset
    assert spec.seeds == tuple(range(main_job.MAIN_JOB.seeds)) and spec.losses[0] == "grpo"
    # the study runs every main-job loss, and the main job only appends its own overrides (the ratio dumps)
    assert set(spec.losses) <= set(study.losses)
    assert spec.overrides[len(cell.overrides(study)):] == main_job.MAIN_JOB.extra_overrides
    assert all(o.startswith("dump_every=") for o in main_job.MAIN_JOB.extra_overrides)
    with pytest.raises(ValueError, match="cells"):
        main_job.main_job_spec(cell="nope")
    with pytest.raises(ValueError, match="seeds"):
        main_job.main_job_spec(seeds=1)


def test_main_job_tiny_end_to_end(tmp_path):
    job = main_job.MainJob(study="tiny", cell="short-u1-k0-same", losses=("grpo", "ctpo", "ctpo_fixed"), seeds=2)
    res = main_job.run_main_job(tmp_path / "m", job=job, progress=False)
    table = res["verdict"]
    # two comparisons against grpo plus ctpo vs ctpo_fixed
    assert list(zip(table["loss"], table["reference"])) == [("ctpo", "grpo"), ("ctpo_fixed", "grpo"),
                                                            ("ctpo", "ctpo_fixed")]
    # 2 seeds: the smallest attainable p is 0.5, nothing can be separated
    assert set(table["verdict"]) <= {"not separated"} and len(res["lines"]) == 3
    saved = json.loads((tmp_path / "m" / "verdict.json").read_text())
    assert saved["seeds"] == [0, 1] and len(saved["comparisons"]) == 3
    # the machine the numbers came from: processor and torch's CPU kernel set
    assert saved["machine"] == machine.machine_record()
    text = (tmp_path / "m" / "verdict.md").read_text()
    assert "machine-dependent" in text and all(line in text for line in res["lines"])
    assert f"Machine: {machine.describe_machine()}." in text
    # the secondary comparison: accuracy averaged over training, checked against np.trapezoid on the raw logs
    auc_table = res["auc_verdict"]
    assert list(zip(auc_table["loss"], auc_table["reference"])) == list(zip(table["loss"], table["reference"]))
    assert set(auc_table["verdict"]) <= {"not separated"} and len(res["auc_lines"]) == 3

    def auc(loss, seed):
        rows = [json.loads(x) for x in (tmp_path / "m" / "runs" / f"{loss}-seed{seed}" / "metrics.jsonl")
                .read_text().splitlines() if x.strip()]
        ev = sorted((r["step"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None)
        steps, acc = np.array([e[0] for e in ev], float), np.array([e[1] for e in ev], float)
        assert len(steps) >= 2
        return np.trapezoid(acc, steps) / (steps[-1] - steps[0])

    for _, r in auc_table.iterrows():
        expected = np.mean([auc(r["loss"], s) - auc(r["reference"], s) for s in (0, 1)])
        assert r["mean difference"] == pytest.approx(expected, abs=1e-12)
    assert "## Secondary: accuracy averaged over training" in text
    assert all(line in text for line in res["auc_lines"])
    assert len(saved["secondary_auc_comparisons"]) == 3
    # a second call reuses the finished runs and gives the same verdict
    again = main_job.run_main_job(tmp_path / "m", job=job, progress=False)
    pd.testing.assert_frame_equal(again["verdict"], table)


@pytest.mark.parametrize("argv, flag", [(["--seeds", "1"], "--seeds"), (["--cell", "nope"], "--cell"),
                                        (["--seed", "-3"], "--seed"), (["--jobs", "0"], "--jobs")])
def test_main_job_cli_errors(argv, flag, tmp_path):
    p = subprocess.run([sys.executable, "-m", "ctpo_lab.train", "main", *argv, "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}"), p.stderr
    assert not (tmp_path / "o").exists()


def test_main_job_seeds_can_separate_after_holm():
    # the main job's seeds: with every seed on one side p = 2/2^n, below 0.05 after Holm over 4 comparisons
    n = main_job.MAIN_JOB.seeds
    assert stats.sign_flip_p_value(np.ones(n)) == pytest.approx(2 / 2**n) and 4 * 2 / 2**n < 0.05
