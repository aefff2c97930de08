"""`python -m ctpo_lab.diagnose`: readers (parquet, npz dumps in both layouts and the fork's loss modes), format
detection, the summary's statistics on synthetic runs of known σ, the CLI end to end and its bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctpo_lab import dumps
from ctpo_lab.diagnose import readers
from ctpo_lab.diagnose.__main__ import main
from ctpo_lab.llm import store
from ctpo_lab.llm.rollout import RolloutBatch
from ctpo_lab.losses import PRESETS

ROOT = Path(__file__).resolve().parents[1]
SIGMA = 0.05


def _walk(n: int, t: int, seed: int, sigma: float = SIGMA):
    """ℓ ~ N(−σ²/2, σ²), random lengths in [t/2, t], groups of 4, advantages ±1 per response."""
    rng = np.random.default_rng(seed)
    ell = -0.5 * sigma**2 + sigma * rng.standard_normal((n, t))
    lengths = rng.integers(t // 2, t + 1, n)
    mask = np.arange(t)[None, :] < lengths[:, None]
    adv = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return np.where(mask, ell, 0.0), mask, adv, np.arange(n) // 4


def _write_parquet(path: Path, n: int = 48, t: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ell, mask, adv, gid = _walk(n, t, seed)
    rng = np.random.default_rng(seed + 1)
    logp_mu = np.where(mask, -rng.random((n, t)) * 2.0, 0.0)
    logp_pi = logp_mu + ell
    batch = RolloutBatch(
        [[1, 2, 3]] * n, torch.as_tensor(gid), torch.as_tensor(gid), torch.zeros(n, t, dtype=torch.int64),
        torch.as_tensor(mask), torch.as_tensor(logp_mu, dtype=torch.float32), torch.ones(n, dtype=torch.bool),
        1.0, 0)
    df = store.batch_to_frame(batch, prompt_ids=[f"p{i}" for i in range(n)], rewards=(adv > 0).astype(float),
                              advantages=adv, logp_target=torch.as_tensor(logp_pi, dtype=torch.float32),
                              target="stale")
    store.write_parquet(path, df)
    f32 = (logp_pi.astype(np.float32).astype(np.float64) - logp_mu.astype(np.float32).astype(np.float64))
    return np.where(mask, f32, 0.0), mask


def _write_dumps(d: Path, *, steps=(1, 2), ranks=2, n: int = 24, t: int = 120, layout: str = "flat",
                 lossless: bool = True, mode: str = "cumprod", sigma: float = SIGMA):
    """Dumps as the writers write them: flat = trainer (`step_*_rank_*.npz`), sub = verl plugin (`step_*/`)."""
    truth = []
    for s in steps:
        for r in range(ranks):
            ell, mask, adv, gid = _walk(n, t, 100 * s + r, sigma)
            L = np.cumsum(ell, axis=1)
            pos = np.cumsum(mask, axis=1)
            lw = {"cumprod": L, "geomean": L / np.maximum(pos, 1), "vanilla": ell,
                  "gspo": np.broadcast_to((L[np.arange(n), mask.sum(1) - 1] / mask.sum(1))[:, None], L.shape)}[mode]
            target = d if layout == "flat" else d / f"step_{s:07d}" / f"rank_{r:04d}_mb_{0:06d}.npz"
            f = dumps.write_ratio_dump(target, L, mask, step=s, rank=r, advantages=adv, group_ids=gid,
                                       log_weight=lw, group_ids_global=layout != "flat")
            if not lossless:  # the authors' fork: weights only
                with np.load(f) as z:
                    arrays = {k: z[k] for k in z.files if k != "cum_log_ratio"}
                np.savez_compressed(f, **arrays)
            truth.append((s, ell, mask))
    return truth


# ------------------------------------------------------------------------------------------------- readers
def test_parquet_round_trip(tmp_path):
    ell, mask = _write_parquet(tmp_path / "traj.parquet")
    assert readers.detect_format(tmp_path / "traj.parquet") == "parquet"
    tr = readers.read_trajectories(tmp_path / "traj.parquet")
    assert tr.format == "parquet" and not tr.lossy and tr.groups is not None and tr.advantages is not None
    np.testing.assert_array_equal(tr.mask, mask)
    np.testing.assert_allclose(tr.log_ratio, ell, atol=1e-6)


@pytest.mark.parametrize("layout", ["flat", "sub"])
def test_dump_round_trip_both_layouts(tmp_path, layout):
    truth = _write_dumps(tmp_path, layout=layout)
    assert readers.detect_format(tmp_path) == "npz"
    tr = readers.read_trajectories(tmp_path)
    assert tr.steps == [1, 2] and not tr.lossy
    np.testing.assert_array_equal(tr.mask, np.vstack([m for _, _, m in truth]))
    np.testing.assert_allclose(tr.log_ratio, np.vstack([e for _, e, _ in truth]), atol=1e-5)
    assert len(np.unique(tr.groups)) == 2 * (2 if layout == "flat" else 1) * 6  # groups distinct per step/rank
    one = readers.read_trajectories(tmp_path, steps=[2])
    assert one.steps == [2] and one.mask.shape[0] == tr.mask.shape[0] // 2


@pytest.mark.parametrize("mode", ["cumprod", "geomean", "vanilla"])
def test_fork_dump_modes(tmp_path, mode):
    truth = _write_dumps(tmp_path, steps=(3,), ranks=1, lossless=False, mode=mode)
    tr = readers.read_trajectories(tmp_path, dump_mode=mode)
    assert any("weights-only" in n for n in tr.notes) and not tr.lossy
    np.testing.assert_allclose(tr.log_ratio, truth[0][1], atol=2e-4)


def test_fork_gspo_refused(tmp_path):
    _write_dumps(tmp_path, steps=(3,), ranks=1, lossless=False, mode="gspo")
    with pytest.raises(ValueError, match="GSPO"):
        readers.read_trajectories(tmp_path)
    with pytest.raises(ValueError, match="dump_mode: GSPO"):
        readers.read_trajectories(tmp_path, dump_mode="gspo")


def test_lossy_dump_is_reported(tmp_path):
    ell, mask, _, _ = _walk(8, 120, 0)
    f = dumps.write_ratio_dump(tmp_path, np.cumsum(ell + 0.2, 1), mask, step=1)  # L_t passes 10
    with np.load(f) as z:
        arrays = {k: z[k] for k in z.files if k != "cum_log_ratio"}  # the fork's weights-only layout
    np.savez_compressed(f, **arrays)
    tr = readers.read_trajectories(tmp_path)
    assert tr.lossy and tr.capped_fraction > 0 and any("lossy" in n for n in tr.notes)


def test_format_detection_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        readers.detect_format(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="no known format"):
        readers.detect_format(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="no known format"):
        readers.detect_format(tmp_path)
    _write_dumps(tmp_path, steps=(1,), ranks=1)
    _write_parquet(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="mixes formats"):
        readers.detect_format(tmp_path)


def test_nan_detected(tmp_path):
    _write_parquet(tmp_path / "t.parquet")
    df = store.read_parquet(tmp_path / "t.parquet")
    row = list(df.at[0, "logp_target"])
    row[1] = float("nan")
    df.at[0, "logp_target"] = row
    store.write_parquet(tmp_path / "t.parquet", df, overwrite=True)
    with pytest.raises(ValueError, match="NaN"):
        readers.read_trajectories(tmp_path / "t.parquet")


# ------------------------------------------------------------------------------------------------- the command
def _run_cli(argv, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ctpo_lab.diagnose", *map(str, argv)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_parquet_end_to_end(tmp_path):
    _write_parquet(tmp_path / "traj.parquet", n=64, t=200)
    res = _run_cli([tmp_path / "traj.parquet", "--out", tmp_path / "rep", "--n-boot", "50"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert s["format"] == "parquet" and s["num_sequences"] == 64 and not s["lossy"]
    assert s["num_tokens"] == int(np.asarray(readers.read_trajectories(tmp_path / "traj.parquet").mask).sum())
    assert abs(s["sigma_hat"] - SIGMA) < 0.2 * SIGMA
    assert s["exponent_ci"][0] <= s["exponent_ci"][1]
    assert abs(s["kl_per_token"] - SIGMA**2 / 2) < 0.5 * SIGMA**2
    assert set(s["clip_rate"]) == set(PRESETS)
    assert all(0.0 <= v <= 1.0 for v in s["clip_rate"].values())
    assert set(s["chain_prediction"]["estimators"]) == set(PRESETS)
    assert s["recommendation"]["preset"] in PRESETS and s["recommendation"]["reasons"]
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    for f in ("report.md", "figure1.png", "drift.png", "clip_ess.png", ".ctpo_lab"):
        assert (tmp_path / "rep" / f).is_file(), f
    again = _run_cli([tmp_path / "traj.parquet", "--out", tmp_path / "rep", "--n-boot", "50", "--chain-seeds", "0"],
                     tmp_path)
    assert again.returncode == 2 and again.stderr.strip().startswith("error: --out:")
    over = _run_cli([tmp_path / "traj.parquet", "--out", tmp_path / "rep", "--n-boot", "50", "--overwrite",
                     "--chain-seeds", "0"], tmp_path)
    assert over.returncode == 0, over.stderr[-2000:]


def test_cli_dump_folder_end_to_end(tmp_path, capsys):
    _write_dumps(tmp_path / "dumps", steps=(1, 2, 3), layout="sub", n=32, t=160)
    rc = main([str(tmp_path / "dumps"), "--out", str(tmp_path / "rep"), "--steps", "2-3", "--n-boot", "50",
               "--chain-seeds", "0"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert s["format"] == "npz" and s["steps"] == [2, 3] and s["num_sequences"] == 2 * 2 * 32
    assert abs(s["sigma_hat"] - SIGMA) < 0.2 * SIGMA
    assert s["exponent_ci"][0] - 0.1 < 0.5 < s["exponent_ci"][1] + 0.1


def test_cli_no_advantages_gives_per_sign_rates(tmp_path, capsys):
    ell, mask, _, _ = _walk(32, 120, 0)
    dumps.write_ratio_dump(tmp_path / "one.npz", np.cumsum(ell, 1), mask, step=0)
    rc = main([str(tmp_path / "one.npz"), "--out", str(tmp_path / "rep"), "--n-boot", "20", "--chain-seeds", "0"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert set(s["clip_rate"]["ctpo"]) == {"positive", "negative"}


def _bad(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _write_dumps(d / "dumps", steps=(1,), ranks=1)
    _write_dumps(d / "gspo", steps=(1,), ranks=1, lossless=False, mode="gspo")
    (d / "x.csv").write_text("a\n")
    (d / "empty").mkdir()
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04" + b"\0" * 30)
    (d / "corrupt.parquet").write_bytes(b"PAR1" + b"\0" * 40)
    _write_parquet(d / "good.parquet", n=8, t=20)
    df = store.read_parquet(d / "good.parquet")
    df.drop(columns=["advantage"]).to_parquet(d / "nocol.parquet")  # a parquet of another writer
    df.assign(logp_target=[["a"] * len(v) for v in df["logp_target"]]).to_parquet(d / "strcol.parquet")
    np.savez(d / "emptystep.npz", pg_update_is_weights=np.ones((1, 2)), response_mask=np.ones((1, 2), np.int8),
             global_step=np.array([], np.int64))
    np.savez(d / "negative.npz", pg_update_is_weights=-np.ones((1, 2)), response_mask=np.ones((1, 2), np.int8))
    (d / "strdump").mkdir()
    np.savez(d / "strdump" / "step_0000003_rank_0000.npz", pg_update_is_weights=np.array([["a", "b"]]),
             response_mask=np.ones((1, 2), np.int8))
    return d


@pytest.mark.parametrize("argv, name", [
    (["missing"], "path"),
    (["x.csv"], "path"),
    (["empty"], "path"),
    (["gspo"], "path"),
    (["dumps", "--dump-mode", "gspo"], "--dump-mode"),
    (["dumps", "--steps", "7"], "--steps"),
    (["dumps", "--steps", "x"], "--steps"),
    (["corrupt.npz"], "path"),
    (["corrupt.parquet"], "path"),
    (["nocol.parquet"], "path"),
    (["strcol.parquet"], "path"),
    (["strdump"], "path"),
    (["dumps", "--seed", "-1"], "--seed"),
    (["dumps", "--target-clip-rate", "0"], "--target-clip-rate"),
    (["dumps", "--target-clip-rate", "1.5"], "--target-clip-rate"),
    (["dumps", "--target-clip-rate", "nan"], "--target-clip-rate"),
    (["dumps", "--chain-seeds", "-1"], "--chain-seeds"),
    (["dumps", "--steps", "0-1000000000000000000000000000000"], "--steps"),
    (["emptystep.npz"], "path"),
    (["negative.npz"], "path"),
])
def test_cli_bad_inputs(tmp_path, capsys, argv, name):
    d = _bad(tmp_path)
    argv = [str(d / argv[0]), *argv[1:]]
    rc = main([*argv, "--out", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}"), lines
    assert not (tmp_path / "rep").exists()


def test_known_sigma_drift_and_exponent_recovered():
    from ctpo_lab.diagnose.pipeline import summarize

    ell, mask, adv, gid = _walk(400, 200, 1)
    s = summarize(readers.Trajectories(ell, mask, adv, gid, None, "parquet"), n_boot=200, chain_seeds=0)
    assert s["sigma_hat_ci"][0] <= SIGMA <= s["sigma_hat_ci"][1], s["sigma_hat_ci"]
    assert s["exponent_ci"][0] <= 0.5 <= s["exponent_ci"][1], s["exponent_ci"]
    kl = SIGMA**2 / 2  # E[e^ℓ − 1 − ℓ] = e^{−σ²/2 + σ²/2} − 1 + σ²/2 for ℓ ~ N(−σ²/2, σ²)
    se = SIGMA / np.sqrt(mask.sum())
    assert abs(s["drift_per_token"] + kl) < 4 * se
    assert abs(s["kl_per_token"] - kl) < 0.1 * kl
