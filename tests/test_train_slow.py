"""Slow trainer checks: the default warm start lands in its accuracy band; ``cpu-smoke`` end to end for two
loss presets (uses the shared warm-start cache; the first run trains it, ≈ 2–3 minutes on 2 cores)."""

import json

import pytest
import torch

from ctpo_lab.train.config import resolve_train_config
from ctpo_lab.train.loop import Trainer
from ctpo_lab.train.policy import evaluate, load_policy
from ctpo_lab.train.tasks import make_task

pytestmark = pytest.mark.slow


def test_warm_start_reaches_target_band():
    torch.set_num_threads(1)
    cfg = resolve_train_config("cpu-smoke")
    task = make_task(cfg.task, **cfg.task_options)
    policy = load_policy(cfg, task, torch.device("cpu"), progress=False)
    ev = evaluate(
        policy,
        task,
        task.test_set(64),
        samples=2,
        temperature=cfg.eval_temperature,
        max_new_tokens=task.max_response_tokens,
        generator=torch.Generator().manual_seed(0),
    )
    assert 0.10 <= ev["eval_accuracy"] <= 0.60, ev
    assert ev["eval/response_length"] >= 100


@pytest.mark.parametrize("loss", ["ctpo", "grpo"])
def test_cpu_smoke_end_to_end(tmp_path, loss):
    cfg = resolve_train_config("cpu-smoke", loss=loss)
    result = Trainer(cfg, tmp_path / loss, progress=False).train()
    recs = [json.loads(x) for x in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_accuracy"] for r in recs if "eval_accuracy" in r]
    assert len(evals) >= 3  # initial + ≥ 2 held-out evaluations
    assert result.final["step"] == cfg.steps
    assert result.final["wall_time"] < 120
    assert any(r.get("offpolicy/kl", 0) > 0 for r in recs[1:])  # later mini-batches are off-policy
    assert max(evals[1:]) > evals[0]  # visible learning
