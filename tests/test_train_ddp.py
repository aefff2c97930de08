"""``torchrun`` with 2 CPU processes (gloo): sharded rollouts, reduced metrics, rank 0 writes."""

import json
import os
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_two_steps(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "CTPO_LAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "ctpo_lab.train",
        "--preset",
        "cpu-tiny",
        "--loss",
        "ctpo",
        "--seed",
        "0",
        "--out",
        str(out),
        "--no-progress",
        "steps=2",
        "device=cpu",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data-parallel ranks=2" in proc.stderr
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone reports
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[1]["offpolicy/updates_per_step"] == 2 and "actor/ppo_kl" in recs[1]
    assert (out / "finished.json").is_file()
    assert sorted(p.name for p in (out / "ratios").glob("*.npz")) == [
        f"step_{s:07d}_rank_{r:04d}.npz" for s in (1, 2) for r in (0, 1)
    ]


def test_ranks_must_divide_the_mini_batch(tmp_path, monkeypatch):
    import torch

    from ctpo_lab.train import distributed, loop
    from ctpo_lab.train.config import resolve_train_config

    monkeypatch.setattr(
        loop, "init_distributed", lambda device: (distributed.Dist(0, 3), torch.device("cpu"))
    )
    with pytest.raises(ValueError, match="data-parallel"):
        loop.Trainer(resolve_train_config("cpu-tiny"), tmp_path / "r", progress=False)
