"""The command-line contract on corrupt grid and study folders (``train compare``, ``train regime``, ``figures``).

A corrupt input (``grid.json``, ``regime.json``, a run's ``metrics.jsonl`` or ``finished.json``, a run folder the
grid would reuse or resume) ends with exit status 2 and one line ``error: <argument or file>: ...`` naming it, no
traceback, before any work starts and with no file written or changed.  The folders are built by hand (no
training); run in-process like tests/test_cli_contract.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_contract_checks import usage_error

from ctpo_lab import compare
from ctpo_lab.runsafety import write_marker
from ctpo_lab.train import regime

LOSSES, SEEDS = ("grpo", "ctpo"), (0, 1)
CELL = "short-u1-k0-same"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CTPO_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _no_training(monkeypatch):
    """A refused grid never gets as far as the shared warm start (nor, after it, any run)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the warm start was prepared: work started before the input was checked")

    monkeypatch.setattr(compare, "_prepare_warm_start", refuse)


def _records(final: float) -> list[dict]:
    return [{"step": 0, "eval_accuracy": 0.2},
            {"step": 1, "reward_mean": 0.3, "pg_update/clip/total/rate": 0.05, "offpolicy/kl_k3": 0.01,
             "response_length/mean": 3.0, "train/nan_updates": 0},
            {"step": 2, "eval_accuracy": final, "pg_update/clip/total/rate": 0.1, "offpolicy/kl_k3": 0.02,
             "response_length/mean": 4.0, "train/nan_updates": 0}]


def _write_runs(grid: Path) -> None:
    write_marker(grid, "python -m ctpo_lab.train compare")
    for i, (loss, seed) in enumerate((a, b) for a in LOSSES for b in SEEDS):
        run = compare.run_dir(grid, loss, seed)
        run.mkdir(parents=True)
        write_marker(run, "python -m ctpo_lab.train")
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(0.3 + 0.1 * i)))
        (run / compare.FINISHED_FILE).write_text(json.dumps({"steps": 2, "wall_time": 1.0, "final": {"step": 2}}))
    (grid / "table2.md").write_text("the user's earlier summary\n")


@pytest.fixture
def grid(tmp_path) -> Path:
    """A finished grid of cpu-tiny runs: grpo, ctpo × seeds 0, 1 (what `train compare` leaves)."""
    g = tmp_path / "grid"
    g.mkdir()
    (g / "grid.json").write_text(json.dumps(compare.GridSpec("cpu-tiny", LOSSES, SEEDS).to_dict()))
    _write_runs(g)
    return g


@pytest.fixture
def study(tmp_path) -> Path:
    """A finished `train regime --preset tiny` study of one cell (grpo, ctpo × seeds 0, 1)."""
    s = tmp_path / "study"
    s.mkdir()
    write_marker(s, regime.COMMAND)
    tiny = regime.STUDY_PRESETS["tiny"]
    spec = {"preset": "tiny", "study": tiny.to_dict(), "losses": list(LOSSES), "seeds": list(SEEDS),
            "cells": {CELL: tiny.cell(CELL).to_dict()}}
    (s / regime.STUDY_FILE).write_text(json.dumps(spec, indent=1))
    _write_runs(s / "cells" / CELL)
    for name in ("regime_map.csv", "regime_map_detail.csv", "regime_runs.csv"):
        (s / name).write_text("the user's earlier table\n")
    return s


def _usage_error(capsys, main, argv, names, roots) -> str:
    """Exit 2, one line ``error: ...`` naming each of ``names``, no traceback, nothing written or changed."""
    return usage_error(capsys, main, argv, names, roots, every_name=True)


def _compare(argv):
    from ctpo_lab.train.__main__ import main

    return main(["compare", *argv])


def _regime(argv):
    return regime.main(argv)


def _figures(argv):
    from ctpo_lab.figures.__main__ import main

    return main(argv)


GRID_RUN = ["--loss", *LOSSES, "--seeds", *map(str, SEEDS), "--preset", "cpu-tiny", "--jobs", "1", "--out"]


# ------------------------------------------------------------------------------------------- regime.json
REGIME_JSON = [
    ("cells", 5),
    ("seeds", "x"),
    ("losses", [1]),
    ("cells", {CELL: 3}),
    ("cells", {"../../elsewhere": {"updates_per_rollout": 1, "staleness": 0, "length": "short", "sampler": "same"}}),
]


@pytest.mark.parametrize("key,value", REGIME_JSON, ids=[f"{k}={v!r}" for k, v in REGIME_JSON])
def test_regime_summarize_only_refuses_a_malformed_regime_json(key, value, study, capsys, tmp_path):
    spec = json.loads((study / regime.STUDY_FILE).read_text())
    spec[key] = value
    (study / regime.STUDY_FILE).write_text(json.dumps(spec))
    _usage_error(capsys, _regime, ["--preset", "tiny", "--out", study, "--summarize-only"],
                 ("--out", str(study / regime.STUDY_FILE), repr(key)), [tmp_path])


@pytest.mark.parametrize("content", ["{}", '{"preset": "tiny", "study": {}, "losses": ["grpo"], "seeds": [0], '
                                           '"cells": 5}'])
def test_figures_regime_refuses_a_malformed_regime_json_before_out(content, study, capsys, tmp_path):
    (study / regime.STUDY_FILE).write_text(content)
    _usage_error(capsys, _figures, ["--out", tmp_path / "figs", "--only", "regime", "--regime", study],
                 ("--regime", str(study / regime.STUDY_FILE)), [tmp_path])
    assert not (tmp_path / "figs").exists()


# ------------------------------------------------------------------------------------------- metrics.jsonl
def _corrupt_metrics(root: Path, how: str) -> Path:
    path = compare.run_dir(root, "grpo", 1) / "metrics.jsonl"
    if how == "empty":
        path.write_text("")
    elif how == "missing":
        path.unlink()
    elif how == "string value":
        path.write_text(path.read_text().replace('"eval_accuracy": 0.2', '"eval_accuracy": "x"'))
    elif how == "string step":
        path.write_text(path.read_text().replace('"step": 1,', '"step": "s1",'))
    return path


METRICS_CASES = ["empty", "missing", "string value", "string step"]


@pytest.mark.parametrize("how", METRICS_CASES)
def test_compare_summarize_only_refuses_corrupt_metrics(how, grid, capsys, tmp_path):
    path = _corrupt_metrics(grid, how)
    _usage_error(capsys, _compare, ["--out", grid, "--summarize-only"], ("--out", str(path)), [tmp_path])


@pytest.mark.parametrize("how", METRICS_CASES)
def test_figures_grid_refuses_corrupt_metrics_before_out(how, grid, capsys, tmp_path):
    path = _corrupt_metrics(grid, how)
    _usage_error(capsys, _figures, ["--out", tmp_path / "figs", "--only", "training", "--grid", grid],
                 ("--grid", str(path)), [tmp_path])
    assert not (tmp_path / "figs").exists()


@pytest.mark.parametrize("how", METRICS_CASES)
def test_regime_refuses_corrupt_metrics_of_a_finished_run(how, study, capsys, tmp_path):
    path = _corrupt_metrics(study / "cells" / CELL, how)
    _usage_error(capsys, _regime, ["--preset", "tiny", "--out", study, "--summarize-only"], ("--out", str(path)),
                 [tmp_path])
    _usage_error(capsys, _figures, ["--out", tmp_path / "figs", "--only", "regime", "--regime", study],
                 ("--regime", str(path)), [tmp_path])
    assert not (tmp_path / "figs").exists()


def test_an_unfinished_run_without_metrics_is_left_out_with_a_warning(grid, capsys):
    run = compare.run_dir(grid, "grpo", 1)
    (run / "metrics.jsonl").unlink()
    (run / compare.FINISHED_FILE).unlink()  # not started: legitimately no log yet
    capsys.readouterr()
    assert compare.main(["--out", str(grid), "--summarize-only"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and str(run / "metrics.jsonl") in err, err


# ------------------------------------------------------------------------------------------- run folders
def _user_run(grid: Path) -> Path:
    run = compare.run_dir(grid, "grpo", 1)
    for f in run.iterdir():
        f.unlink()
    (run / "notes.txt").write_text("a user's own file\n")
    return run


def _corrupt_checkpoints(grid: Path) -> Path:
    run = compare.run_dir(grid, "grpo", 1)
    (run / compare.FINISHED_FILE).unlink()  # interrupted: the grid would resume it
    (run / "ckpt").mkdir()
    for step in (1, 2):
        (run / "ckpt" / f"step_{step:07d}.pt").write_bytes(b"garbage" * 10)
    return run / "ckpt"


def _garbage_finished(grid: Path) -> Path:
    path = compare.run_dir(grid, "grpo", 1) / compare.FINISHED_FILE
    path.write_text("garbage\n")
    return path


def _malformed_finished(grid: Path) -> Path:
    path = compare.run_dir(grid, "grpo", 1) / compare.FINISHED_FILE
    path.write_text(json.dumps({"steps": "x"}))
    return path


def _runs_is_a_file(grid: Path) -> Path:
    import shutil

    shutil.rmtree(grid / "runs")
    (grid / "runs").write_text("not a folder\n")
    return grid / "runs"


RUN_FOLDER_CASES = [_user_run, _corrupt_checkpoints, _garbage_finished, _malformed_finished, _runs_is_a_file]


@pytest.mark.parametrize("damage", RUN_FOLDER_CASES, ids=[f.__name__.strip("_") for f in RUN_FOLDER_CASES])
def test_compare_checks_every_run_folder_before_any_launch(damage, grid, capsys, tmp_path):
    bad = damage(grid)
    _usage_error(capsys, _compare, [*GRID_RUN, grid], ("--out", str(bad)), [tmp_path])
    assert not (grid / "logs").exists()


# ------------------------------------------------------------------------------------------- key=value overrides
@pytest.mark.parametrize("extra,flag", [(["seed=5"], "--seed"), (["loss=grpo"], "--loss"),
                                        (["loss.name=grpo"], "--loss"), (["--steps", "2", "steps=3"], "--steps")])
def test_compare_refuses_overrides_the_grid_sets_itself(extra, flag, capsys, tmp_path):
    out = tmp_path / "g"
    line = _usage_error(capsys, _compare, [*GRID_RUN, out, *extra], ("overrides", flag), [tmp_path])
    assert extra[-1] in line
    assert not out.exists()
