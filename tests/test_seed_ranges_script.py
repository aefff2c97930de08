"""scripts/main_job_seed_ranges.py: the main job's tables and verdicts restricted to ranges of a grid's seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctpo_lab import compare
from ctpo_lab.train import main_job

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "main_job_seed_ranges.py"
LOSSES = ("grpo", "gspo", "ctpo", "ctpo_fixed")


def _grid(tmp_path: Path, n_seeds: int) -> Path:
    """A main-job-shaped grid: eval_accuracy at steps 0, 4, 8 per run, CTPO ahead of GRPO on seeds 0–5 only."""
    rng = np.random.default_rng(0)
    spec = compare.GridSpec("cpu", LOSSES, tuple(range(n_seeds)))
    (tmp_path / "grid.json").write_text(json.dumps(spec.to_dict()))
    for loss in LOSSES:
        for seed in range(n_seeds):
            lead = 0.2 if (loss == "ctpo" and seed < 6) else 0.0
            accs = [0.2, 0.4 + lead / 2 + rng.integers(0, 20) / 256, 0.6 + lead + rng.integers(0, 40) / 256]
            path = compare.run_dir(tmp_path, loss, seed)
            path.mkdir(parents=True)
            recs = [{"step": s, "eval_accuracy": a, "reward_mean": a} for s, a in zip((0, 4, 8), accs)]
            (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
            # what the trainer writes on completion (steps, wall time, the last record)
            (path / compare.FINISHED_FILE).write_text(json.dumps({"steps": 8, "wall_time": 1.0, "final": recs[-1]}))
    return tmp_path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_ranges_match_the_verdict_of_the_seed_subset(tmp_path):
    grid = _grid(tmp_path, 12)
    res = _run(str(grid), "0-5", "6-11")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    df = compare.load_grid(grid)
    for first, last in ((0, 5), (6, 11)):
        section = text.split(f"## seeds {first}–{last}")[1].split("## seeds")[0]
        assert f"({last - first + 1} paired seeds)" in section
        sub = df[(df["seed"] >= first) & (df["seed"] <= last)]
        table = main_job.grid_verdict(sub, "grpo")
        row = table[table["loss"] == "ctpo"].iloc[0]
        expected = (f"| ctpo − grpo | {row['mean difference']:+.3f} [{row['CI low']:+.3f}, {row['CI high']:+.3f}] | "
                    f"{row['sign-flip p']:.2g} | {row['holm p']:.2g} | {row['verdict']} |")
        assert expected in section
        ends_above = int(sum(sub[(sub.loss == "ctpo") & (sub.step == 8)].set_index("seed")["eval_accuracy"]
                             > sub[(sub.loss == "grpo") & (sub.step == 8)].set_index("seed")["eval_accuracy"]))
        ctpo_row = next(line for line in section.splitlines() if line.startswith("| ctpo |"))
        assert ctpo_row.endswith(f"| {ends_above} of {last - first + 1} |")
    # CTPO leads by 0.2 on seeds 0–5: every one of them, p = 2/2^6 before Holm
    first_section = text.split("## seeds 0–5")[1].split("## seeds")[0]
    assert "| 6 of 6 |" in first_section and "| ctpo − grpo | +0.2" in first_section


@pytest.mark.parametrize("args, message", [
    (("5-2",), "error: ranges: expected A-B with 0 <= A <= B"),
    (("0-x",), "error: ranges: expected A-B"),
    (("40-45",), "error: ranges: 40-45 holds 0 finished seed(s)"),
])
def test_bad_ranges_are_one_error_line(tmp_path, args, message):
    res = _run(str(_grid(tmp_path, 4)), *args)
    assert res.returncode == 2 and res.stderr.startswith(message) and res.stderr.count("\n") == 1, res.stderr
    assert res.stdout == ""


def test_not_a_grid_folder(tmp_path):
    res = _run(str(tmp_path), "0-3")
    assert res.returncode == 2 and res.stderr.startswith("error: grid: ") and "Traceback" not in res.stderr
