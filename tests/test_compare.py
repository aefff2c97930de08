"""Aggregation of a grid of runs: curves, tables, paired tests (on synthetic run folders)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ctpo_lab import compare, stats


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
                {"step": 5, "reward_mean": 0.3, "pg_update/clip/total/rate": 0.05, "offpolicy/kl_k3": 0.01},
                {"step": 10, "eval_accuracy": finals[loss][seed], "reward_mean": 0.5,
                 "pg_update/clip/total/rate": 0.1, "offpolicy/kl_k3": 0.02},
            ]
            (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
            # what the trainer writes on completion (steps, wall time, the last record)
            (path / compare.FINISHED_FILE).write_text(json.dumps({"steps": 10, "wall_time": 1.0, "final": recs[-1]}))
    return spec


def test_sign_flip_p_value_is_exact():
    # all 3 differences positive: only the all-+ and all-− patterns are as extreme → 2/8
    assert stats.sign_flip_p_value(np.array([0.1, 0.2, 0.3])) == pytest.approx(0.25)
    # 5 equal positive differences → 2/32
    assert stats.sign_flip_p_value(np.full(5, 0.1)) == pytest.approx(2 / 32)
    # symmetric differences: mean 0 → p = 1
    assert stats.sign_flip_p_value(np.array([0.1, -0.1])) == pytest.approx(1.0)


def _enumerated_p(d: np.ndarray) -> float:
    """The sign-flip p by direct enumeration: pattern i flips d_j where bit j of i is 0."""
    n = d.size
    idx = np.arange(2**n, dtype=np.int64)
    sums = np.zeros(2**n)
    for j in range(n):
        sums += (((idx >> j) & 1) * 2 - 1) * d[j]
    return float((np.abs(sums / n) >= abs(d.mean()) - 1e-12).mean())


@pytest.mark.parametrize("n", [7, 20, 21, 22, 23])
def test_sign_flip_p_value_equals_enumeration(n):
    # the meet-in-the-middle count beyond 20 differences equals enumerating all 2^n patterns: continuous
    # differences, differences on a 1/256 grid (accuracies over 256 samples: many exact ties), all equal, all 0
    rng = np.random.default_rng(n)
    cases = [rng.normal(0.03, 0.1, n), rng.integers(-40, 60, n) / 256, np.full(n, 0.05), np.zeros(n)]
    for d in cases:
        assert stats.sign_flip_p_value(d) == _enumerated_p(d)
    assert stats.sign_flip_is_exact(n)


def test_sign_flip_p_value_large_n():
    # 40 seeds, every difference positive: exactly 2/2^40 (Monte Carlo would report ~1/200 001)
    assert stats.sign_flip_p_value(np.ones(40)) == 2 / 2**40
    assert stats.sign_flip_is_exact(40) and not stats.sign_flip_is_exact(41)
    # beyond 40: Monte Carlo (k + 1)/(N + 1), never 0
    assert stats.sign_flip_p_value(np.ones(41)) == pytest.approx(1 / 200_001)
    # the Monte Carlo estimator against the exact count at n = 22: within 5 standard errors of N = 200 000
    d = np.random.default_rng(5).normal(0.02, 0.1, 22)
    exact = _enumerated_p(d)
    assert 0.01 < exact < 0.99
    assert abs(stats.monte_carlo_sign_flip_p_value(d, 200_000) - exact) < 5 * np.sqrt(exact * (1 - exact) / 200_000)
    # no test on no or non-finite differences: NaN (left out of a Holm family)
    assert np.isnan(stats.sign_flip_p_value(np.array([])))
    assert np.isnan(stats.sign_flip_p_value(np.array([0.1, np.nan])))
    assert np.isnan(stats.holm_adjust(np.array([np.nan, 0.01])))[0]


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
    assert table.loc["ctpo", "KL after last update mean"] == pytest.approx(0.015)
    paired = compare.paired_comparison(df, "ctpo").set_index("loss")
    assert paired.loc["grpo", "mean difference"] == pytest.approx(-(0.1 + 0.15 + 0.2) / 3)
    assert paired.loc["grpo", "sign-flip p"] == pytest.approx(0.25)


def test_summarize_grid_writes_every_output(tmp_path):
    finals = {"grpo": {0: 0.3, 1: 0.4}, "ctpo": {0: 0.5, 1: 0.4}, "ctpo_fixed": {0: 0.45, 1: 0.35}}
    _fake_grid(tmp_path, finals)
    result = compare.summarize_grid(tmp_path)
    for name in ("curves.csv", "table2.csv", "table2.md", "paired.csv", "table3.csv", "table3.md", "fig2.png",
                 "fig2.pdf"):
        assert (tmp_path / name).is_file(), name
    assert set(result) == {"table2", "paired", "table3"}
    curves = compare.metric_curves(compare.load_grid(tmp_path), "eval_accuracy")
    np.testing.assert_allclose(curves["ctpo"].estimate, [0.2, 0.45])


def test_summarize_only_flag_keeps_its_old_spelling():
    assert compare.build_parser().parse_args(["--summarize-only"]).summarize_only
    assert compare.build_parser().parse_args(["--aggregate-only"]).summarize_only
    assert not compare.build_parser().parse_args([]).summarize_only


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


def test_grid_is_resumable(tmp_path, monkeypatch):
    """A grid run twice reuses its finished runs; an interrupted run is resumed and ends as if uninterrupted."""
    from ctpo_lab.train.config import resolve_train_config
    from ctpo_lab.train.loop import TIMING_KEYS, Trainer
    from ctpo_lab.train.policy import cache_dir

    monkeypatch.setenv("CTPO_LAB_CACHE", str(tmp_path / "cache"))
    spec = compare.GridSpec("cpu-tiny", ("grpo",), (0, 1), steps=2)
    out = tmp_path / "grid"
    paths = compare.run_grid(spec, out, jobs=2, progress=False)
    assert len(list(cache_dir().glob("*/meta.json"))) == 1  # the warm start was trained once, before the runs

    def records(path):
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in rows]

    reference = records(paths[("grpo", 1)])
    finished0 = (paths[("grpo", 0)] / compare.FINISHED_FILE).stat().st_mtime_ns
    # replace seed 1 by an interrupted run (1 of 2 steps, checkpoint written)
    import shutil

    shutil.rmtree(paths[("grpo", 1)])
    cfg = resolve_train_config("cpu-tiny", loss="grpo", seed=1, steps=2)
    assert Trainer(cfg, paths[("grpo", 1)], progress=False).train(interrupt_after=1).interrupted
    assert not (paths[("grpo", 1)] / compare.FINISHED_FILE).exists()
    compare.run_grid(spec, out, jobs=2, progress=False)
    assert (paths[("grpo", 0)] / compare.FINISHED_FILE).stat().st_mtime_ns == finished0  # reused
    assert (paths[("grpo", 1)] / compare.FINISHED_FILE).is_file()  # resumed to the end
    assert records(paths[("grpo", 1)]) == reference
    with pytest.raises(ValueError, match="overwrite"):  # another grid in the same folder is refused
        compare.run_grid(compare.GridSpec("cpu-tiny", ("ctpo",), (0,), steps=2), out, progress=False)
    with pytest.raises(ValueError, match="overwrite"):  # so is a grid with fewer seeds
        compare.run_grid(compare.GridSpec("cpu-tiny", ("grpo",), (0,), steps=2), out, progress=False)
    # a grid with more seeds extends this one: its finished runs are kept, only the new seed runs
    more = compare.run_grid(compare.GridSpec("cpu-tiny", ("grpo",), (0, 1, 2), steps=2), out, progress=False)
    assert (paths[("grpo", 0)] / compare.FINISHED_FILE).stat().st_mtime_ns == finished0
    assert (more[("grpo", 2)] / compare.FINISHED_FILE).is_file()
    assert json.loads((out / "grid.json").read_text())["seeds"] == [0, 1, 2]
    assert records(paths[("grpo", 1)]) == reference


def test_extends_only_adds_seeds_or_losses():
    old = compare.GridSpec("cpu", ("grpo", "ctpo"), (0, 1), ("lr=1e-4",), 4).to_dict()
    assert compare.extends(compare.GridSpec("cpu", ("grpo", "ctpo"), (0, 1, 2), ("lr=1e-4",), 4), old)
    assert compare.extends(compare.GridSpec("cpu", ("grpo", "ctpo", "gspo"), (1, 0), ("lr=1e-4",), 4), old)
    assert compare.extends(compare.GridSpec("cpu", ("grpo", "ctpo"), (0, 1), ("lr=1e-4",), 4), old)
    assert not compare.extends(compare.GridSpec("cpu", ("grpo",), (0, 1, 2), ("lr=1e-4",), 4), old)  # a loss fewer
    assert not compare.extends(compare.GridSpec("cpu", ("grpo", "ctpo"), (1, 2), ("lr=1e-4",), 4), old)  # seed 0 gone
    assert not compare.extends(compare.GridSpec("cpu", ("grpo", "ctpo"), (0, 1, 2), ("lr=2e-4",), 4), old)
    assert not compare.extends(compare.GridSpec("cpu", ("grpo", "ctpo"), (0, 1, 2), ("lr=1e-4",), 8), old)
    assert not compare.extends(compare.GridSpec("cpu-tiny", ("grpo", "ctpo"), (0, 1, 2), ("lr=1e-4",), 4), old)
    assert not compare.extends(compare.GridSpec(), None)
    assert not compare.extends(compare.GridSpec(), {"train_preset": "cpu", "overrides": [], "steps": None})


def test_concurrent_warm_starts_train_once(tmp_path, monkeypatch):
    """Parallel runs starting together: one trains the warm start, the other waits for the cached result."""
    import subprocess
    import sys

    monkeypatch.setenv("CTPO_LAB_CACHE", str(tmp_path / "cache"))
    code = (
        "import torch; from ctpo_lab.train.config import resolve_train_config as r; "
        "from ctpo_lab.train.policy import load_policy; from ctpo_lab.train.tasks import make_task; "
        "c = r('cpu-tiny', overrides=['warmstart_steps=40']); "
        "p = load_policy(c, make_task(c.task, **c.task_options), torch.device('cpu'), progress=True); "
        "print(p.info['warmstart_key'], p.info['warmstart_seconds'])"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_MININTERVAL="0")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]  # the same cached warm start (same key, same recorded training time)
    assert sum("warm start" in err for _, err in outs) == 1  # trained by exactly one process
