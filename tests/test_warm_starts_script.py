"""scripts/main_job_warm_starts.py: the main job's verdicts per warm start and pooled over warm starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ctpo_lab import compare
from ctpo_lab.train import main_job

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "main_job_warm_starts.py"
LOSSES = ("grpo", "gspo", "ctpo", "ctpo_fixed")


def _grid(root: Path, key: str, ws_seed: int, lead: float, n_seeds: int = 6, rng_seed: int = 0,
          losses: tuple[str, ...] = LOSSES) -> Path:
    """A main-job-shaped grid from one warm start: CTPO ends ``lead`` above GRPO on every seed."""
    rng = np.random.default_rng(rng_seed)
    spec = compare.GridSpec("cpu", losses, tuple(range(n_seeds)))
    root.mkdir(parents=True)
    (root / "grid.json").write_text(json.dumps(spec.to_dict()))
    for loss in losses:
        for seed in range(n_seeds):
            extra = lead if loss == "ctpo" else 0.0
            accs = [0.2, 0.4 + extra / 2 + rng.integers(0, 20) / 256, 0.6 + extra + rng.integers(0, 40) / 256]
            path = compare.run_dir(root, loss, seed)
            path.mkdir(parents=True)
            recs = [{"step": s, "eval_accuracy": a, "reward_mean": a} for s, a in zip((0, 4, 8), accs)]
            (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
            (path / "config.yaml").write_text(yaml.safe_dump({
                "warmstart_seed": ws_seed, "warmstart_steps": 2000,
                "policy": {"warmstart_key": key, "warmstart_loss": 0.05, "initial_eval_accuracy": 0.2,
                           "initial_eval_prompts": 64}}))
            # what the trainer writes on completion (steps, wall time, the last record)
            (path / compare.FINISHED_FILE).write_text(json.dumps({"steps": 8, "wall_time": 1.0, "final": recs[-1]}))
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def _row(table: pd.DataFrame, loss: str) -> str:
    r = table[table["loss"] == loss].iloc[0]
    return (f"| {loss} − {r['reference']} | {r['mean difference']:+.3f} [{r['CI low']:+.3f}, {r['CI high']:+.3f}] | "
            f"{r['sign-flip p']:.2g} | {r['holm p']:.2g} | {r['verdict']} |")


def test_pooled_verdict_pairs_runs_by_warm_start_and_seed(tmp_path):
    a = _grid(tmp_path / "a", "key_a", 0, lead=0.2, rng_seed=0)
    b = _grid(tmp_path / "b", "key_b", 1, lead=0.0, rng_seed=1)
    res = _run(str(a), str(b))
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "warm start seed 0, 2000 supervised steps (key key_a)" in text
    assert "warm start seed 1, 2000 supervised steps (key key_b)" in text
    pooled = text.split("## pooled over 2 warm starts")[1]
    assert "(12 paired seeds)" in pooled
    # independently: the two grids concatenated with their seeds made distinct
    da, db = compare.load_grid(a), compare.load_grid(b)
    both = pd.concat([da, db.assign(seed=db["seed"] + 100)], ignore_index=True)
    expected = main_job.grid_verdict(both, "grpo")
    assert _row(expected, "ctpo") in pooled
    # CTPO leads on the 6 seeds of grid a only: 6 of 12 pairs end above GRPO there plus whatever b gives
    first = text.split("## warm start seed 0")[1].split("## ")[0]
    assert "| 6 of 6 |" in first
    assert _row(main_job.grid_verdict(da, "grpo"), "ctpo") in first


def test_one_grid_has_no_pooled_section(tmp_path):
    res = _run(str(_grid(tmp_path / "a", "key_a", 0, lead=0.1)))
    assert res.returncode == 0, res.stderr
    assert "## pooled" not in res.stdout and "(6 paired seeds)" in res.stdout


@pytest.mark.parametrize("second, message", [
    ({"key": "key_a", "ws_seed": 0}, "start from the same warm start key_a"),
    ({"key": "key_b", "ws_seed": 1, "losses": ("grpo", "ctpo")}, "compares ['grpo', 'ctpo']"),
])
def test_bad_grid_sets_are_one_error_line(tmp_path, second, message):
    a = _grid(tmp_path / "a", "key_a", 0, lead=0.1)
    b = _grid(tmp_path / "b", second["key"], second["ws_seed"], lead=0.1, losses=second.get("losses", LOSSES))
    res = _run(str(a), str(b))
    assert res.returncode == 2 and res.stderr.startswith("error: grids: ") and message in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and res.stdout == ""


def test_a_grid_that_mixes_warm_starts_is_refused(tmp_path):
    a = _grid(tmp_path / "a", "key_a", 0, lead=0.1)
    path = compare.run_dir(a, "ctpo", 3) / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["policy"]["warmstart_key"] = "other"
    path.write_text(yaml.safe_dump(cfg))
    res = _run(str(a))
    assert res.returncode == 2 and "mixes warm starts" in res.stderr and "Traceback" not in res.stderr


def test_not_a_grid_folder(tmp_path):
    res = _run(str(tmp_path))
    assert res.returncode == 2 and res.stderr.startswith("error: grids: ") and "Traceback" not in res.stderr
