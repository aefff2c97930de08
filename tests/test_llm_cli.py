"""End to end: `python -m ctpo_lab.llm` with the tiny random model (run, resume, overwrite, analyze, fit)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ctpo_lab.llm.__main__ import main

torch.set_num_threads(1)

SMALL = ["--model", "tiny-random", "--train-prompts", "4", "--eval-prompts", "8", "--group-size", "4",
         "--max-new-tokens", "40", "--prompts-per-chunk", "4", "--k", "1,2", "--minibatches", "2",
         "--lr", "1e-3", "--bin-width", "8", "--n-boot", "50", "--no-progress"]


def _run(out, *extra):
    return main(["--out", str(out), *SMALL, *extra])


def _fails(capsys, argv, match):
    """The CLI ends with exit status 2 and one line ``error: <argument>: ...`` on stderr."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm") / "run"
    assert _run(out, "--seed", "0") == 0
    return out


def test_end_to_end_outputs(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    for key in ("sigma_hat", "exponent", "exponent_ci", "drift_per_token", "clip_rate_fixed_window",
                "clip_rate_sqrt_t_window"):
        assert key in s
    assert s["primary_target"] == "stale_k2" and set(s["targets"]) == {"stale_k1", "stale_k2"}
    assert s["agreement_max_abs_diff"] <= 1e-4
    assert s["sigma_hat"] > 0 and len(s["exponent_ci"]) == 2
    for name in ("figure1.png", "figure1.pdf", "drift.png", "config.json", "updates.json"):
        assert (run_dir / name).is_file()
    assert (run_dir / "dumps" / "stale_k2" / "step_0000002_rank_0000.npz").is_file()
    assert (run_dir / "dumps" / "updates" / "step_0000000_rank_0000.npz").is_file()
    df = pd.read_parquet(run_dir / "targets" / "stale_k1.parquet")
    assert len(df) == 32 and (df["split"] == "eval").all() and df["kl"].notna().all()


def test_same_seed_same_numbers_and_no_silent_overwrite(run_dir, tmp_path, capsys):
    assert _fails(capsys, ["--out", str(run_dir), *SMALL, "--seed", "0"], "exists").startswith("error: --out: ")
    other = tmp_path / "again"
    _run(other, "--seed", "0")
    a = json.loads((run_dir / "summary.json").read_text())
    b = json.loads((other / "summary.json").read_text())
    assert a["sigma_hat"] == b["sigma_hat"] and a["exponent_ci"] == b["exponent_ci"]
    # an interrupted collection (a shard lost) resumes to the same rollouts
    shard = other / "rollouts" / "shard_00001.parquet"
    before = pd.read_parquet(shard)
    shard.unlink()
    _run(other, "--seed", "0", "--resume")
    after = pd.read_parquet(shard)
    assert before["token_ids"].map(list).tolist() == after["token_ids"].map(list).tolist()
    assert json.loads((other / "summary.json").read_text())["sigma_hat"] == a["sigma_hat"]
    _fails(capsys, ["--out", str(other), *SMALL, "--seed", "1", "--resume"], "differs")
    _fails(capsys, ["--out", str(other), *SMALL, "--resume", "--overwrite"], "mutually exclusive")
    _run(other, "--seed", "1", "--overwrite")


def test_analyze_and_fit_subcommands(run_dir, capsys):
    _fails(capsys, ["analyze", str(run_dir)], "overwrite")
    assert main(["analyze", str(run_dir), "--overwrite"]) == 0
    assert main(["fit", str(run_dir / "targets" / "stale_k2.parquet"), "--bin-width", "8", "--min-count", "8",
                 "--n-boot", "50"]) == 0
    assert "exponent_ci" in capsys.readouterr().out
    assert main(["fit", str(run_dir / "dumps" / "stale_k2"), "--bin-width", "8", "--min-count", "8",
                 "--n-boot", "50"]) == 0


def test_other_sources(tmp_path):
    for source, extra in (("temperature", ["--temperature", "0.8"]), ("dtype", [])):
        out = tmp_path / source
        main(["--out", str(out), *SMALL, "--source", source, *extra])
        s = json.loads((out / "summary.json").read_text())
        assert s["source"] == source and s["targets"][s["primary_target"]]["kl_per_token"] >= 0


def test_bad_input_fails_before_work(tmp_path, capsys):
    _fails(capsys, ["--out", str(tmp_path / "a"), *SMALL[2:], "--model", str(tmp_path / "missing")],
           "--model: no model folder")
    pd.DataFrame({"prompt": []}).to_parquet(tmp_path / "empty.parquet")
    _fails(capsys, ["--out", str(tmp_path / "b"), *SMALL, "--prompts", str(tmp_path / "empty.parquet")],
           "--prompts: ")
    _fails(capsys, ["--out", str(tmp_path / "c"), *SMALL, "--max-new-tokens", "5000"], "--max-new-tokens: ")
    _fails(capsys, ["--out", str(tmp_path / "d"), *SMALL, "--source", "checkpoints"], "--target-model: ")
    _fails(capsys, ["--out", str(tmp_path / "e"), *SMALL, "--loss", "ppo9"], "--loss: unknown preset")
    _fails(capsys, ["--out", str(tmp_path / "e"), *SMALL, "--preset", "ppo9"], "--loss: unknown preset")  # former name
    _fails(capsys, ["--out", str(tmp_path / "f"), *SMALL, "--group-size", "1"], "--group-size: ")
    _fails(capsys, ["--out", str(tmp_path / "g"), *SMALL, "--source", "temperature"], "--temperature: ")
    _fails(capsys, ["fit", str(tmp_path / "nothing.parquet")], "error: ")
    _fails(capsys, ["analyze", str(tmp_path / "nothing")], "error: dir: ")
    assert not any((tmp_path / n).exists() for n in "abcdefg")


def test_library_functions_raise_value_errors(tmp_path):
    from ctpo_lab.llm import pipeline

    with pytest.raises(ValueError, match="^group_size: "):
        pipeline.resolve_run_config(out=str(tmp_path / "x"), group_size=1)
    with pytest.raises(ValueError, match="^loss: "):
        pipeline.RunConfig(out=str(tmp_path / "x"), loss="nope").validate()
    cfg = pipeline.resolve_run_config(out=str(tmp_path / "x"), quick=True, loss="grpo", k=[2])
    assert (cfg.model, cfg.loss, cfg.k, cfg.lr) == ("tiny-random", "grpo", [2], pipeline.QUICK["lr"])
    assert pipeline.resolve_run_config(out="x", quick=True, model="smollm2").lr == pipeline.RunConfig.lr
    with pytest.raises(ValueError, match="^dir: "):
        pipeline.analyze_run(tmp_path / "missing")


def test_two_checkpoints_source(tmp_path):
    from ctpo_lab.llm.models import tiny_random

    for seed, name in ((0, "a"), (1, "b")):
        model, tok = tiny_random(seed)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = tmp_path / "ckpt"
    main(["--out", str(out), *SMALL[2:], "--model", str(tmp_path / "a"), "--source", "checkpoints",
          "--target-model", str(tmp_path / "b")])
    s = json.loads((out / "summary.json").read_text())
    assert s["primary_target"] == "checkpoint" and s["targets"]["checkpoint"]["kl_per_token"] > 0
