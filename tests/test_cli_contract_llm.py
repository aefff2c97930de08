"""The command-line contract of ``python -m ctpo_lab.llm`` and ``python -m ctpo_lab.diagnose`` on the inputs a
fuzzer found: absurd budgets (``--n-boot``, ``--chain-seeds``), a bin wider than every response, bad prompt
sources, target models and ``--params``, no subcommand.  Each ends with exit status 2 and one line
``error: <argument>: ...`` naming the argument, no traceback, nothing written — and, where a model would be
loaded, before it is (the loader is replaced by one that fails the test)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cli_contract_checks import usage_error

from ctpo_lab import dumps
from ctpo_lab.diagnose.__main__ import main as diagnose_main
from ctpo_lab.llm.__main__ import main as llm_main
from ctpo_lab.llm.limits import MAX_BOOT, MAX_CHAIN_SEEDS, MIN_BOOT

T = 60  #: the longest response of the dumps below


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CTPO_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def d(tmp_path):
    """Dumps of 32 random walks (lengths ≤ T), a garbage parquet, an empty folder, a plain file."""
    rng = np.random.default_rng(0)
    n = 32
    ell = 0.05 * rng.standard_normal((n, T))
    lengths = rng.integers(T // 2, T + 1, n)
    lengths[0] = T
    mask = np.arange(T)[None, :] < lengths[:, None]
    L = np.cumsum(np.where(mask, ell, 0.0), axis=1)
    dumps.write_ratio_dump(tmp_path / "dumps", L, mask, step=1, rank=0,
                           advantages=np.where(rng.random(n) < 0.5, -1.0, 1.0), group_ids=np.arange(n) // 4)
    (tmp_path / "garbage.parquet").write_bytes(b"not a parquet file at all")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "afile").write_text("")
    return tmp_path


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every check must come before it."""
    from ctpo_lab.llm import models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)


def _usage_error(capsys, main, argv, names, roots) -> str:
    """Exit 2, one line ``error: <name>: ...`` naming the argument, no traceback, nothing written."""
    return usage_error(capsys, main, argv, names, roots)


# ------------------------------------------------------------------------------------------- budgets and bins
DIAGNOSE_CASES = [
    (["--n-boot", "99999999999"], "--n-boot"),
    (["--n-boot", "2147483648"], "--n-boot"),
    (["--n-boot", str(MAX_BOOT + 1)], "--n-boot"),
    (["--chain-seeds", "2147483648"], "--chain-seeds"),
    (["--chain-seeds", str(MAX_CHAIN_SEEDS + 1)], "--chain-seeds"),
    (["--bin-width", "100000"], "--bin-width"),
    (["--bin-width", "2147483648"], "--bin-width"),
    (["--bin-width", str(T + 1)], "--bin-width"),
]


@pytest.mark.parametrize("argv,name", DIAGNOSE_CASES, ids=[" ".join(c[0]) for c in DIAGNOSE_CASES])
def test_diagnose_budgets_and_bin_width(argv, name, capsys, d):
    line = _usage_error(capsys, diagnose_main, [d / "dumps", "--out", d / "rep", *argv], name, [d])
    assert "nan" not in line.lower()
    assert not (d / "rep").exists()


FIT_CASES = [
    (["--n-boot", "99999999999"], "--n-boot"),
    (["--n-boot", str(MIN_BOOT - 1)], "--n-boot"),
    (["--bin-width", "2147483648"], "--bin-width"),
    (["--bin-width", str(T + 1)], "--bin-width"),
    (["--min-count", "100000", "--bin-width", "10"], ("--bin-width", "--min-count")),  # σ̂ undefined: no NaN
]


@pytest.mark.parametrize("argv,name", FIT_CASES, ids=[" ".join(c[0]) for c in FIT_CASES])
def test_llm_fit_budgets_and_bin_width(argv, name, capsys, d):
    _usage_error(capsys, llm_main, ["fit", d / "dumps", *argv], name, [d])
    assert capsys.readouterr().out == ""


def test_bin_width_up_to_the_longest_response_works_and_writes_no_nan(capsys, d):
    assert llm_main(["fit", str(d / "dumps"), "--bin-width", str(T), "--min-count", "8", "--n-boot", "20"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out)  # strict JSON: no NaN
    assert "NaN" not in out and res["undefined"] == [] and math.isfinite(res["sigma_hat"])
    rc = diagnose_main([str(d / "dumps"), "--out", str(d / "rep"), "--bin-width", str(T), "--n-boot", "20",
                        "--chain-seeds", "0"])
    assert rc == 0, capsys.readouterr().err
    text = (d / "rep" / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)


def test_non_finite_values_are_null_and_named():
    from ctpo_lab.diagnose.pipeline import json_ready

    s = json_ready({"sigma_hat_ci": [float("nan"), 1.0], "x": {"y": np.float64("inf")}, "notes": []})
    assert s["sigma_hat_ci"] == [None, 1.0] and s["x"]["y"] is None
    assert s["undefined"] == ["sigma_hat_ci[0]", "x.y"] and "sigma_hat_ci[0]" in s["notes"][-1]
    json.dumps(s, allow_nan=False)


# ------------------------------------------------------------------------------------------- llm run: before loading
SMALL = ["--model", "tiny-random", "--train-prompts", "4", "--eval-prompts", "8", "--group-size", "4",
         "--max-new-tokens", "40", "--k", "1,2", "--no-progress"]
RUN_CASES = [
    (lambda d: ["--prompts", "bogus"], "--prompts"),
    (lambda d: ["--prompts", d / "garbage.parquet"], "--prompts"),
    (lambda d: ["--prompts", d / "emptydir"], "--prompts"),
    (lambda d: ["--prompts", "hf:"], "--prompts"),
    (lambda d: ["--source", "checkpoints", "--target-model", d / "afile"], "--target-model"),
    (lambda d: ["--source", "checkpoints", "--target-model", d / "emptydir"], "--target-model"),
    (lambda d: ["--model", d / "afile"], "--model"),
    (lambda d: ["--n-boot", "2147483647"], "--n-boot"),  # ≤ MAX_COUNT but far beyond MAX_BOOT
    (lambda d: ["--bin-width", "41"], "--bin-width"),  # wider than --max-new-tokens
]


@pytest.mark.parametrize("case", range(len(RUN_CASES)))
def test_llm_run_checks_before_loading(case, capsys, d, no_model):
    extra, name = RUN_CASES[case]
    _usage_error(capsys, llm_main, ["run", "--out", d / "lo", *SMALL, *extra(d)], name, [d])
    assert not (d / "lo").exists()


def test_llm_analyze_bin_width_and_n_boot(capsys, d):
    run = d / "run"
    (run / "targets").mkdir(parents=True)
    from ctpo_lab.runsafety import write_marker

    write_marker(run, "python -m ctpo_lab.llm")
    import torch

    from ctpo_lab.llm import store
    from ctpo_lab.llm.rollout import RolloutBatch

    n, t = 8, 20
    mask = torch.arange(t)[None, :] < torch.tensor([20, 12, 15, 18, 20, 9, 11, 14])[:, None]
    gid = torch.arange(n) // 4
    batch = RolloutBatch([[1, 2, 3]] * n, gid, gid, torch.zeros(n, t, dtype=torch.int64), mask,
                         torch.zeros(n, t), torch.ones(n, dtype=torch.bool), 1.0, 0)
    df = store.batch_to_frame(batch, prompt_ids=[f"p{i}" for i in range(n)], rewards=np.zeros(n),
                              advantages=np.zeros(n), logp_target=torch.zeros(n, t), target="stale")
    store.write_parquet(run / "targets" / "stale_k1.parquet", df)
    _usage_error(capsys, llm_main, ["analyze", run, "--bin-width", "21"], "--bin-width", [d])
    _usage_error(capsys, llm_main, ["analyze", run, "--n-boot", "99999999999"], "--n-boot", [d])


# ------------------------------------------------------------------------------------------- llm bias: before loading
BIAS_CASES = [
    (["--params", "bogus"], "--params"),
    (["--params", "last:0"], "--params"),
    (["--params", "last:-1"], "--params"),
    (["--params", "last:x"], "--params"),
    (["--params", ""], "--params"),
    (["--n-boot", "0"], "--n-boot"),
    (["--n-boot", str(MIN_BOOT - 1)], "--n-boot"),
    (["--n-boot", "2147483647"], "--n-boot"),
    (["--chain-seeds", "2147483648"], "--chain-seeds"),
    (["--prompts", "bogus"], "--prompts"),
    (["--prompts", "hf:"], "--prompts"),
]


@pytest.mark.parametrize("argv,name", BIAS_CASES, ids=[" ".join(c[0]) or "''" for c in BIAS_CASES])
def test_llm_bias_checks_before_loading(argv, name, capsys, d, no_model):
    _usage_error(capsys, llm_main, ["bias", "--out", d / "bo", "--quick", "--no-progress", *argv], name, [d])
    assert not (d / "bo").exists()


def test_bias_reanalyze_budgets(capsys, d):
    for argv, name in ((["--n-boot", "0"], "--n-boot"), (["--chain-seeds", "99999999999"], "--chain-seeds")):
        _usage_error(capsys, llm_main, ["bias", "--out", d / "bo", "--reanalyze", *argv], name, [d])


# ------------------------------------------------------------------------------------------- no subcommand
def test_llm_without_arguments_is_one_line(capsys):
    capsys.readouterr()
    assert llm_main([]) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: command: required"), lines
    assert all(c in lines[0] for c in ("run", "analyze", "fit", "bias")) and cap.out == ""
    with pytest.raises(SystemExit) as e:
        llm_main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out
