"""The trainer end to end on a tiny configuration: metrics, exact resume, run-folder protection, NaN handling,
ratio dumps and the CLI."""

import json
import math

import pytest
import torch

from ctpo_lab.train import loop as loop_mod
from ctpo_lab.train.__main__ import main
from ctpo_lab.train.config import resolve_train_config
from ctpo_lab.train.loop import TIMING_KEYS, NanLossError, Trainer

REQUIRED = [
    "step",
    "reward_mean",
    "response_length/mean",
    "entropy",
    "actor/ppo_kl",
    "actor/pg_clipfrac",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "pg_update/clip/total/rate",
    "pg_update/is_ratio/p50",
    "pg_update/is_ratio/p99",
    "actor/grad_norm",
    "perf/tokens_per_s",
    "wall_time",
    "offpolicy/kl",
    "offpolicy/kl_k3",
    "offpolicy/last_mb/ppo_kl",
    "offpolicy/updates_per_step",
    "time/gen",
    "time/score",
    "time/update",
    "eval_accuracy",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CTPO_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def tiny(**over):
    items = [f"{k}={v}" for k, v in over.items()]
    return resolve_train_config("cpu-tiny", overrides=items, loss=over.pop("loss", "ctpo"))


def _strip(records):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in records]


def test_one_step_changes_policy_and_logs_every_metric(tmp_path, capsys):
    trainer = Trainer(tiny(steps=1), tmp_path / "run", progress=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert "2 optimizer updates per rollout batch" in capsys.readouterr().err
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    rec = result.history[-1]
    missing = [k for k in REQUIRED if k not in rec]
    assert not missing, missing
    assert rec["step"] == 1 and rec["offpolicy/updates_per_step"] == 2
    assert abs(rec["offpolicy/first_mb/ppo_kl"]) < 1e-6  # first update on-policy
    assert rec["offpolicy/kl_k3"] > 0  # the policy moved
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1]
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "finished.json").is_file()
    from ctpo_lab import dumps

    d = dumps.read_ratio_dump(next((tmp_path / "run" / "ratios").glob("step_*.npz")))
    assert d.step == 1 and d.mask.any()


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    full = Trainer(tiny(steps=4), tmp_path / "a", progress=False).train()
    part = Trainer(tiny(steps=4), tmp_path / "b", progress=False).train(interrupt_after=2)
    assert part.interrupted and [r["step"] for r in part.history] == [0, 1, 2]
    resumed = Trainer(tiny(steps=4), tmp_path / "b", resume=True, progress=False)
    assert resumed.start_step == 2
    resumed.train()
    a = _strip(json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
    b = _strip(json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    assert a == b
    assert full.final["step"] == 4


def test_existing_run_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    monkeypatch.setattr(loop_mod, "load_policy", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        Trainer(tiny(), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="mutually exclusive"):
        Trainer(tiny(), tmp_path / "run", resume=True, overwrite=True, progress=False)
    assert main(["--preset", "cpu-tiny", "--out", str(tmp_path / "run"), "--no-progress"]) == 2


def test_resume_with_a_different_config_is_refused(tmp_path):
    Trainer(tiny(steps=1), tmp_path / "run", progress=False).train()
    with pytest.raises(ValueError, match="lr"):
        Trainer(tiny(steps=2, lr=0.1), tmp_path / "run", resume=True, progress=False)


def test_overwrite_replaces_the_folder(tmp_path):
    from ctpo_lab.runsafety import write_marker

    (tmp_path / "run").mkdir()
    write_marker(tmp_path / "run", "python -m ctpo_lab.train")  # a folder ctpo_lab created (only those are replaced)
    (tmp_path / "run" / "junk.txt").write_text("x")
    Trainer(tiny(steps=1), tmp_path / "run", overwrite=True, progress=False).train()
    assert not (tmp_path / "run" / "junk.txt").exists()


def test_nan_loss_skips_then_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    real = loop_mod.compute_policy_loss
    state = {"calls": 0}

    def nan_after_first_step(*args, **kwargs):
        out = real(*args, **kwargs)
        state["calls"] += 1
        if state["calls"] > 2:  # step 1 has 2 good updates, then every loss is NaN
            return out._replace(loss=out.loss * math.nan)
        return out

    monkeypatch.setattr(loop_mod, "compute_policy_loss", nan_after_first_step)
    trainer = Trainer(tiny(steps=10, max_nan_steps=2), tmp_path / "run", progress=False)
    with (
        pytest.warns(UserWarning, match="non-finite loss"),
        pytest.raises(NanLossError, match="2 consecutive"),
    ):
        trainer.train()
    ckpts = sorted((tmp_path / "run" / "ckpt").glob("step_*.pt"))
    assert ckpts[-1].name == "step_0000001.pt"
    state_dict = torch.load(ckpts[-1], weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in state_dict.values())
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("train/nan_updates") for r in recs[1:]] == [0, 2, 2]


def test_cli_errors_and_print_config(tmp_path, capsys):
    assert main(["--loss", "ppo9", "--out", str(tmp_path / "x")]) == 2
    assert "preset" in capsys.readouterr().err
    assert main(["--preset", "cpu-tiny", "mini_batch_prompts=3", "--out", str(tmp_path / "x")]) == 2
    assert "mini_batch_prompts" in capsys.readouterr().err
    assert main(["--preset", "cpu-tiny", "model=/no/such/dir", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    assert main(["--preset", "cpu-smoke", "--loss", "grpo", "--seed", "5", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["loss"], cfg["seed"], cfg["preset"]) == ("grpo", 5, "cpu-smoke")


def test_cli_runs_tiny_preset(tmp_path, capsys):
    assert (
        main(
            [
                "--preset",
                "cpu-tiny",
                "--loss",
                "grpo",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "r"),
                "--no-progress",
                "steps=1",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 1 and 0 <= summary["eval_accuracy"] <= 1


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    from ctpo_lab.runsafety import write_marker

    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "python -m ctpo_lab.train")  # a run stopped after its step-0 evaluation, before a checkpoint
    (run / "metrics.jsonl").write_text('{"step": 0, "eval_accuracy": 0.5}\n')
    Trainer(tiny(steps=1), run, resume=True, progress=False).train()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1]
    Trainer(
        tiny(steps=1), tmp_path / "new", resume=True, progress=False
    ).train()  # no folder yet: fresh start


def test_no_arguments_dispatch_to_the_main_job(monkeypatch):
    from ctpo_lab import compare
    from ctpo_lab.train import main_job

    seen = []
    monkeypatch.setattr(main_job, "main", lambda argv: seen.append(("main", list(argv))) or 0)
    monkeypatch.setattr(compare, "main", lambda argv: seen.append(("compare", list(argv))) or 0)
    assert main([]) == 0 and main(["main", "--seed", "3"]) == 0 and main(["compare", "--preset", "cpu-tiny"]) == 0
    assert seen == [("main", []), ("main", ["--seed", "3"]), ("compare", ["--preset", "cpu-tiny"])]


def test_hf_model_on_chat_prompts_runs_one_step(tmp_path):
    cfg = resolve_train_config(
        "cpu-tiny",
        loss="gspo",
        overrides=[
            "model=tiny-random",
            "task=parquet",
            "task_options.path=arithmetic",
            "task_options.limit=40",
            "max_new_tokens=12",
            "eval_prompts=4",
            "steps=1",
            "dump_every=0",
        ],
    )
    result = Trainer(cfg, tmp_path / "hf", progress=False).train()
    rec = result.history[-1]
    assert rec["step"] == 1 and rec["response_length/mean"] > 0 and "pg_update/is_ratio/p50" in rec


def test_ctrl_c_finishes_the_step_and_checkpoints(tmp_path, monkeypatch):
    import signal

    trainer = Trainer(tiny(steps=5, ckpt_every=100), tmp_path / "run", progress=False)
    real_step = trainer.train_step

    def step_then_sigint(step):
        rec = real_step(step)
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # as if Ctrl-C was pressed during step 2
        return rec

    monkeypatch.setattr(trainer, "train_step", step_then_sigint)
    result = trainer.train()
    assert result.interrupted and result.history[-1]["step"] == 2
    assert [p.name for p in trainer.run.checkpoints()] == ["step_0000002.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = Trainer(tiny(steps=5, ckpt_every=100), tmp_path / "run", resume=True, progress=False).train()
    assert resumed.final["step"] == 5 and not resumed.interrupted


def test_track_without_wandb_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ValueError, match="track"):
        Trainer(tiny(track=True), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_reusing_the_sampler_log_probs_skips_the_old_log_prob_forward(tmp_path, monkeypatch):
    calls = []
    real = loop_mod.response_log_probs
    monkeypatch.setattr(loop_mod, "response_log_probs", lambda *a, **k: calls.append(k) or real(*a, **k))
    result = Trainer(tiny(steps=1, recompute_old_log_prob=False), tmp_path / "run", progress=False).train()
    rec = result.history[-1]
    assert math.isfinite(rec["entropy"]) and rec["entropy"] > 0 and "actor/ppo_kl" in rec
    assert not any(k.get("with_entropy") for k in calls)  # only the updates' and the KL forwards
    assert len(calls) == 2 + 1  # 2 mini-batch updates + the measured-KL forward


def test_a_loss_config_trains_and_a_resume_rebuilds_it_from_config_yaml(tmp_path):
    import yaml

    from ctpo_lab.losses import resolve_config
    from ctpo_lab.train.config import TrainConfig
    from ctpo_lab.train.loop import train

    custom = resolve_config("ctpo", clip_exponent=0.25, name="ctpo_p025")
    trainer = Trainer(tiny(steps=2), tmp_path / "run", progress=False, loss=custom)
    assert trainer.loss_config == custom and trainer.cfg.loss == custom
    part = trainer.train(interrupt_after=1)
    assert part.interrupted
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["loss"]["name"] == "ctpo_p025" and saved["resolved_loss"] == saved["loss"]
    rebuilt = TrainConfig.from_dict(saved)
    assert rebuilt.loss == custom
    resumed = Trainer(rebuilt, tmp_path / "run", resume=True, progress=False)
    assert resumed.start_step == 1 and resumed.loss_config == custom
    assert resumed.train().final["step"] == 2
    with pytest.raises(ValueError, match="resume.*loss"):  # the preset's own ctpo is another loss
        Trainer(tiny(steps=2), tmp_path / "run", resume=True, progress=False)
    result = train(tiny(steps=1), tmp_path / "fn", progress=False, loss=resolve_config("tis"))
    assert result.final["step"] == 1
