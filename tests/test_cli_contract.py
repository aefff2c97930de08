"""One command-line contract for every entry point.

Each bad input ends with exit status 2 and one line ``error: <argument>: <what was expected>`` on stderr that
names the argument, prints no traceback and writes no file. The tables below are run in-process (fast); a few
cases per entry point also run as real processes (the exit status and stderr a user sees).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_contract_checks import usage_error

ROOT = Path(__file__).resolve().parents[1]
GALLERY = ROOT / "paper_figures"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CTPO_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def d(tmp_path):
    """A folder of bad inputs: a regular file, a user's own folder, corrupt grids and files."""
    (tmp_path / "file").write_text("not a folder\n")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.tex").write_text("a user's own file\n")
    (tmp_path / "stray").mkdir()  # a user's folder holding a file named like ctpo_lab's marker, not its content
    (tmp_path / "stray" / ".ctpo_lab").write_text("garbage marker\n")
    (tmp_path / "stray" / "thesis.tex").write_text("a user's own file\n")
    from ctpo_lab.runsafety import write_marker

    (tmp_path / "trainrun" / "ckpt").mkdir(parents=True)  # another command's output: never replaced by this one
    write_marker(tmp_path / "trainrun", "python -m ctpo_lab.train")
    (tmp_path / "trainrun" / "ckpt" / "step_0000010.pt").write_bytes(b"a checkpoint")
    (tmp_path / "garbage.parquet").write_bytes(b"not a parquet file at all")
    (tmp_path / "llm_failed").mkdir()  # an llm run whose only target could not be measured
    (tmp_path / "llm_failed" / "config.json").write_text(json.dumps({"model": "tiny-random"}))
    (tmp_path / "llm_failed" / "summary.json").write_text(json.dumps(
        {"settings": {"bin_width": 16}, "targets": {"temperature_1.5": {"error": "too few sequences"}}}))
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\nsteps: : :\n")
    (tmp_path / "badgrid").mkdir()
    (tmp_path / "badgrid" / "grid.json").write_text('{"losses": ["grpo"], "seeds": [0')
    g = tmp_path / "badmetrics"
    (g / "runs" / "grpo-seed0").mkdir(parents=True)
    (g / "grid.json").write_text(json.dumps({"train_preset": "cpu-tiny", "losses": ["grpo"], "seeds": [0],
                                             "overrides": [], "steps": None}))
    (g / "runs" / "grpo-seed0" / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "eval_acc\n{"step": 2}\n')
    (tmp_path / "trunc.parquet").write_bytes(b"PAR1" + b"\0" * 40)
    (tmp_path / "npz").mkdir()
    (tmp_path / "npz" / "step_0000001_rank_0000.npz").write_bytes(b"PK\x03\x04" + b"\0" * 30)
    return tmp_path


def _usage_error(capsys, main, argv, names, roots):
    """Exit 2, one line ``error: <name>: ...`` naming the argument, no traceback, nothing written."""
    usage_error(capsys, main, argv, names, roots)


# ------------------------------------------------------------------------------------------- python -m ctpo_lab
MAIN_CASES = [
    (["--sigma", "inf"], "--sigma"),
    (["--sigma", "nan"], "--sigma"),
    (["--sigma", "-1"], "--sigma"),
    (["--seed", "-1"], "--seed"),
    (["--batch", "0"], "--batch"),
    (["--length", "x"], "--length"),
    (["--loss", "ppo9"], "--loss"),
    (["--bogus"], "--bogus"),
    (["--batch", "100000", "--length", "100000"], "--batch"),
    (["--seed", "1000000000000000000000000000000"], "--seed"),
]


@pytest.mark.parametrize("argv,name", MAIN_CASES, ids=[" ".join(c[0]) for c in MAIN_CASES])
def test_main_bad_input(argv, name, capsys, tmp_path):
    from ctpo_lab.__main__ import main

    _usage_error(capsys, main, argv, name, [tmp_path])


# ------------------------------------------------------------------------------------------- python -m ctpo_lab.train
def _train_cases():
    run = ["--preset", "cpu-tiny", "--no-progress", "--out"]
    cases = [
        (lambda d: [*run, d / "r", "--seed", "-1"], "--seed"),
        (lambda d: [*run, d / "r", "--steps", "0"], "--steps"),
        (lambda d: [*run, d / "r", "--steps", "x"], "--steps"),
        (lambda d: [*run, d / "r", "--loss", "ppo9"], "--loss"),
        (lambda d: ["--preset", "nope", "--out", d / "r"], "--preset"),
        (lambda d: [*run, d / "r", "lr=nan"], "lr"),
        (lambda d: [*run, d / "r", "lr=inf"], "lr"),
        (lambda d: [*run, d / "r", "lr=abc"], "lr"),
        (lambda d: [*run, d / "r", "bogus_key=1"], "overrides"),
        (lambda d: [*run, d / "r", "lr"], "overrides"),
        (lambda d: [*run, d / "r", "mini_batch_prompts=3"], "mini_batch_prompts"),
        (lambda d: [*run, d / "r", "model=/no/such/dir"], "model"),
        (lambda d: [*run, d / "r", "loss_overrides.eps_high=nan"], "loss_overrides"),
        (lambda d: [*run, d / "r", "loss_overrides.log_ratio_clamp=-1"], "loss_overrides"),
        (lambda d: [*run, d / "r", "--config", d / "missing.yaml"], "--config"),
        (lambda d: [*run, d / "r", "--config", d / "bad.yaml"], "--config"),
        (lambda d: [*run, d / "file"], "--out"),
        (lambda d: [*run, "/proc/ctpo_lab_test"], "--out"),
        (lambda d: [*run, d / "r", "--resume", "--overwrite"], "--overwrite"),
        (lambda d: [*run, d / "user"], "--out"),
        (lambda d: [*run, d / "user", "--overwrite"], "--out"),
        (lambda d: [*run, d / "r", "--bogus"], "--bogus"),
        (lambda d: [*run, d / "r", "--seed", "1000000000000000000000000000000"], "--seed"),
        (lambda d: [*run, d / "r", "--steps", "1000000000000000000000000000000"], "--steps"),
        (lambda d: [*run, d / "r", "seed=" + "1000000000000000000000000000000"], "--seed"),
        (lambda d: [*run, d / "r", "steps=1099511627776"], "--steps"),
        (lambda d: [*run, d / "r", "preset=bogus"], "--preset"),
        (lambda d: [*run, d / "user", "--resume"], "--out"),
        (lambda d: [*run, d / "stray", "--overwrite"], "--out"),
        (lambda d: [*run, d / "stray", "--resume"], "--out"),
    ]
    if not torch.cuda.is_available():
        cases.append((lambda d: [*run, d / "r", "device=cuda"], "device"))
    return cases


TRAIN_CASES = _train_cases()


@pytest.mark.parametrize("case", range(len(TRAIN_CASES)))
def test_train_bad_input(case, capsys, d):
    from ctpo_lab.train.__main__ import main

    argv, name = TRAIN_CASES[case]
    _usage_error(capsys, main, argv(d), name, [d])


# ------------------------------------------------------------------------------------------- train compare
def _compare_cases():
    grid = ["--preset", "cpu-tiny", "--out"]
    return [
        (lambda d: [*grid, d / "g", "--loss", "ppo9"], "--loss"),
        (lambda d: [*grid, d / "g", "--seeds", "0", "0"], "--seeds"),
        (lambda d: [*grid, d / "g", "--seeds", "-1"], "--seeds"),
        (lambda d: [*grid, d / "g", "--loss", "grpo", "grpo"], "--loss"),
        (lambda d: [*grid, d / "g", "--steps", "0"], "--steps"),
        (lambda d: [*grid, d / "g", "lr=nan"], "lr"),
        (lambda d: [*grid, d / "g", "notanoverride"], "overrides"),
        (lambda d: [*grid, d / "g", "--jobs", "0"], "--jobs"),
        (lambda d: [*grid, d / "g", "--seed", "-1"], "--seed"),
        (lambda d: [*grid, d / "g", "--num-seeds", "0"], "--num-seeds"),
        (lambda d: [*grid, d / "g", "--reference", "ppo9"], "--reference"),
        (lambda d: ["--preset", "nope", "--out", d / "g"], "--preset"),
        (lambda d: [*grid, d / "file"], "--out"),
        (lambda d: [*grid, d / "user"], "--out"),
        (lambda d: [*grid, d / "user", "--overwrite"], "--out"),
        (lambda d: [*grid, d / "g", "--aggregate-only"], "--out"),
        (lambda d: [*grid, d / "badgrid", "--aggregate-only"], "--out"),
        (lambda d: [*grid, d / "badmetrics", "--aggregate-only"], "--out"),
        (lambda d: [*grid, d / "g", "--bogus"], "--bogus"),
        (lambda d: [*grid, d / "g", "--num-seeds", "1000000000000000000000000000000"], "--num-seeds"),
        (lambda d: [*grid, d / "g", "--seeds", "1000000000000000000000000000000"], "--seeds"),
        (lambda d: [*grid, d / "g", "--seed", str(2**63 - 1)], "--seed"),
        (lambda d: [*grid, d / "g", "--seeds", "0", "--seed", "1"], "--seeds"),
        (lambda d: [*grid, d / "g", "--seeds", "0", "--num-seeds", "2"], "--seeds"),
        (lambda d: [*grid, d / "g", "--loss", "grpo", "dapo", "--reference", "ctpo"], "--reference"),
        (lambda d: [*grid, d / "g", "--jobs", "1000000000000000000000000000000"], "--jobs"),
        (lambda d: [*grid, d / "stray", "--overwrite"], "--out"),
    ]


COMPARE_CASES = _compare_cases()


@pytest.mark.parametrize("case", range(len(COMPARE_CASES)))
def test_compare_bad_input(case, capsys, d):
    from ctpo_lab.train.__main__ import main

    argv, name = COMPARE_CASES[case]
    _usage_error(capsys, lambda a: main(["compare", *a]), argv(d), name, [d])


MAIN_JOB_CASES = [
    (lambda d: ["--out", d / "m", "--seeds", "1000000000000000000000000000000"], "--seeds"),
    (lambda d: ["--out", d / "m", "--seed", str(2**63 - 2)], "--seed"),
    (lambda d: ["--out", d / "stray", "--overwrite"], "--out"),
]


@pytest.mark.parametrize("case", range(len(MAIN_JOB_CASES)))
def test_main_job_bad_input(case, capsys, d):
    from ctpo_lab.train.__main__ import main

    argv, name = MAIN_JOB_CASES[case]
    _usage_error(capsys, lambda a: main(["main", *a]), argv(d), name, [d])


def test_compare_corrupt_inputs_name_the_file(capsys, d):
    from ctpo_lab.train.__main__ import main

    for folder, file in (("badgrid", "grid.json"), ("badmetrics", "metrics.jsonl")):
        capsys.readouterr()
        assert main(["compare", "--out", str(d / folder), "--aggregate-only"]) == 2
        err = capsys.readouterr().err
        assert file in err and ("not valid JSON" in err or "line 2" in err), err


# ------------------------------------------------------------------------------------------- python -m ctpo_lab.llm
SMALL = ["--model", "tiny-random", "--train-prompts", "4", "--eval-prompts", "8", "--group-size", "4",
         "--max-new-tokens", "40", "--k", "1,2", "--no-progress"]


def _llm_cases():
    r = lambda d, *extra: ["--out", d / "llm", *SMALL, *extra]  # noqa: E731
    return [
        (lambda d: r(d, "--lr", "nan"), "--lr"),
        (lambda d: r(d, "--lr", "inf"), "--lr"),
        (lambda d: r(d, "--lr", "0"), "--lr"),
        (lambda d: r(d, "--seed", "-1"), "--seed"),
        (lambda d: r(d, "--temperature", "0"), "--temperature"),
        (lambda d: r(d, "--temperature", "nan"), "--temperature"),
        (lambda d: r(d, "--group-size", "1"), "--group-size"),
        (lambda d: r(d, "--train-prompts", "0"), "--train-prompts"),
        (lambda d: r(d, "--bin-width", "0"), "--bin-width"),
        (lambda d: r(d, "--n-boot", "0"), "--n-boot"),
        (lambda d: r(d, "--loss", "ppo9"), "--loss"),
        (lambda d: r(d, "--k", "0"), "--k"),
        (lambda d: r(d, "--k", "x"), "--k"),
        (lambda d: r(d, "--source", "checkpoints"), "--target-model"),
        (lambda d: r(d, "--source", "bogus"), "--source"),
        (lambda d: r(d, "--resume", "--overwrite"), "--overwrite"),
        (lambda d: ["--out", d / "file", *SMALL], "--out"),
        (lambda d: ["--out", "/proc/ctpo_lab_test", *SMALL], "--out"),
        (lambda d: ["--out", d / "user", *SMALL], "--out"),
        (lambda d: ["--out", d / "user", *SMALL, "--overwrite"], "--out"),
        (lambda d: SMALL, "--out"),
        (lambda d: r(d, "--k", "1,,2"), "--k"),
        (lambda d: r(d, "--pad-token", ""), "--pad-token"),
        (lambda d: r(d, "--cache", d / "file"), "--cache"),
        (lambda d: r(d, "--cache", "/proc/ctpo_lab_test"), "--cache"),
        (lambda d: r(d, "--group-size", "1000000000000000000000000000000"), "--group-size"),
        (lambda d: r(d, "--seed", "1000000000000000000000000000000"), "--seed"),
        (lambda d: ["--out", d / "user", *SMALL, "--resume"], "--out"),
        (lambda d: ["--out", d / "stray", *SMALL, "--overwrite"], "--out"),
        (lambda d: ["analyze", d / "nothing"], "dir"),
        (lambda d: ["analyze", d / "user"], "dir"),
        (lambda d: ["analyze", d / "user", "--bin-width", "0"], "--bin-width"),
        (lambda d: ["fit", d / "nothing.parquet"], "path"),
        (lambda d: ["fit", d / "trunc.parquet"], "path"),
        (lambda d: ["fit", d / "npz"], "path"),
        (lambda d: ["fit", d / "npz", "--bin-width", "0"], "--bin-width"),
        (lambda d: ["fit", d / "npz", "--step", "-1"], "--step"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--lr", "nan"], "--lr"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--seed", "-1"], "--seed"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--sources", "stale,bogus"], "--sources"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--k", "0"], "--k"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--mu-temperature", "1"], "--mu-temperature"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--loss", "ppo9"], "--loss"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--eval-prompts", "1"], "--eval-prompts"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--group-size", "1"], "--group-size"),
        (lambda d: ["bias", "--out", "/proc/ctpo_lab_test", "--quick"], "--out"),
        (lambda d: ["bias", "--out", d / "file", "--quick"], "--out"),
        (lambda d: ["bias", "--out", d / "user", "--quick"], "--out"),
        (lambda d: ["bias", "--out", d / "user", "--quick", "--overwrite"], "--out"),
        (lambda d: ["bias", "--out", d / "user", "--reanalyze"], "--out"),
        (lambda d: ["bias", "--quick"], "--out"),
        (lambda d: ["bias", "--out", d / "b", "--bogus"], "--bogus"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--k", "1,,2"], "--k"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--k", "1,1"], "--k"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--sources", "stale,stale"], "--sources"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--pad-token", ""], "--pad-token"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--cache", d / "file"], "--cache"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--directions", "1" + "0" * 30], "--directions"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--threads", "1000000000000000000000000000000"], "--threads"),
        (lambda d: ["bias", "--out", d / "b", "--quick", "--prompts", d / "garbage.parquet"], "--prompts"),
        (lambda d: ["bias", "--out", d / "trainrun", "--quick", "--overwrite"], "--out"),
        (lambda d: r(d, "--prompts", d / "garbage.parquet"), "--prompts"),
        (lambda d: ["--out", d / "trainrun", *SMALL, "--resume"], "--out"),
    ]


LLM_CASES = _llm_cases()


@pytest.mark.parametrize("case", range(len(LLM_CASES)))
def test_llm_bad_input(case, capsys, d):
    from ctpo_lab.llm.__main__ import main

    argv, name = LLM_CASES[case]
    _usage_error(capsys, main, argv(d), name, [d])


def test_corrupt_trajectory_files_name_the_file(capsys, d):
    from ctpo_lab.llm.__main__ import main

    for path, name in ((d / "trunc.parquet", "trunc.parquet"), (d / "npz", "step_0000001_rank_0000.npz")):
        capsys.readouterr()
        assert main(["fit", str(path)]) == 2
        err = capsys.readouterr().err
        assert name in err and "corrupt or truncated" in err, err


# ------------------------------------------------------------------------------------------- python -m ctpo_lab.markov
MARKOV_CASES = [
    (lambda d: ["--out", d / "m", "--seed", "-1"], "--seed"),
    (lambda d: ["--out", d / "m", "--seed", "x"], "--seed"),
    (lambda d: ["--out", "/proc/ctpo_lab_test"], "--out"),
    (lambda d: ["--out", d / "file"], "--out"),
    (lambda d: ["--out", d / "user", "--quick"], "--out"),
    (lambda d: ["--out", d / "user", "--quick", "--overwrite"], "--out"),
    (lambda d: ["--out", d / "m", "--bogus"], "--bogus"),
    (lambda d: ["--out", d / "trainrun", "--quick", "--overwrite"], "--out"),
    (lambda d: ["--out", d / "stray", "--quick", "--overwrite"], "--out"),
]


@pytest.mark.parametrize("case", range(len(MARKOV_CASES)))
def test_markov_bad_input(case, capsys, d):
    from ctpo_lab.markov.__main__ import main

    argv, name = MARKOV_CASES[case]
    _usage_error(capsys, main, argv(d), name, [d])


# ------------------------------------------------------------------------------------------- python -m ctpo_lab.figures
FIGURES_CASES = [
    (lambda d: ["--out", d / "f", "--seed", "-1"], "--seed"),
    (lambda d: ["--out", d / "f", "--grid", d / "nothing"], "--grid"),
    (lambda d: ["--out", d / "f", "--grid", d / "user"], "--grid"),
    (lambda d: ["--out", d / "f", "--grid", d / "badgrid"], "--grid"),
    (lambda d: ["--out", d / "f", "--llm-run", d / "nothing"], "--llm-run"),
    (lambda d: ["--out", d / "f", "--llm-run", d / "user"], "--llm-run"),
    (lambda d: ["--out", d / "f", "--llm-bias", d / "user"], "--llm-bias"),
    (lambda d: ["--out", d / "f", "--only", "bogus"], "--only"),
    (lambda d: ["--out", d / "file", "--quick", "--only", "markov"], "--out"),
    (lambda d: ["--out", "/proc/ctpo_lab_test", "--quick", "--only", "markov"], "--out"),
    (lambda d: ["--quick", "--out", GALLERY], "--out"),
    (lambda d: ["--out", GALLERY, "--only", "llm"], "--llm-run"),
    (lambda d: ["--out", GALLERY, "--only", "llm_bias"], "--llm-bias"),
    (lambda d: ["--out", d / "f", "--bogus"], "--bogus"),
    (lambda d: ["--out", d / "user", "--quick", "--only", "markov"], "--out"),
    (lambda d: ["--out", d / "trainrun", "--quick", "--only", "markov"], "--out"),
    (lambda d: ["--out", "", "--quick", "--only", "markov"], "--out"),
    (lambda d: ["--out", d / "f", "--quick", "--only", "llm", "--llm-model", ""], "--llm-model"),
    (lambda d: ["--out", d / "f", "--only", "training", "--grid", d / "badmetrics"], "--grid"),
    (lambda d: ["--out", d / "f", "--only", "llm", "--llm-run", d / "llm_failed"], "--llm-run"),
]


@pytest.mark.parametrize("case", range(len(FIGURES_CASES)))
def test_figures_bad_input(case, capsys, d, monkeypatch):
    from ctpo_lab.figures.__main__ import main

    argv, name = FIGURES_CASES[case]
    roots = [d] + ([GALLERY] if GALLERY.is_dir() else [])
    _usage_error(capsys, main, argv(d), name, roots)


def test_figures_quick_never_writes_the_gallery_by_default():
    from ctpo_lab.figures.__main__ import GALLERY as gallery
    from ctpo_lab.figures.__main__ import QUICK_OUT

    assert gallery == GALLERY and not QUICK_OUT.startswith("paper_figures")


# ------------------------------------------------------------------------------------------- real processes
PROCESS_CASES = [
    (["ctpo_lab", "--sigma", "inf"], "--sigma"),
    (["ctpo_lab.train", "--preset", "cpu-tiny", "--seed", "-1", "--out", "{d}/r"], "--seed"),
    (["ctpo_lab.train", "compare", "--preset", "cpu-tiny", "--seeds", "0", "0", "--out", "{d}/g"], "--seeds"),
    (["ctpo_lab.llm", "--out", "{d}/l", "--quick", "--lr", "nan"], "--lr"),
    (["ctpo_lab.llm", "bias", "--out", "{d}/b", "--quick", "--lr", "nan"], "--lr"),
    (["ctpo_lab.markov", "--out", "/proc/ctpo_lab_test"], "--out"),
    (["ctpo_lab.figures", "--seed", "-1", "--out", "{d}/f"], "--seed"),
]


def test_real_processes_exit_2_with_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [(subprocess.Popen([sys.executable, "-m", *(a.format(d=tmp_path) for a in argv)], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), name)
             for argv, name in PROCESS_CASES]
    for p, name in procs:
        _, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode == 2, (p.args, p.returncode, err[-500:])
        assert len(lines) == 1 and lines[0].startswith(f"error: {name}:"), (p.args, err[-500:])
    assert sorted(os.listdir(tmp_path)) == []


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    from ctpo_lab import cli

    def body():
        raise KeyboardInterrupt

    assert cli.run(body, prog="python -m ctpo_lab.markov") == 130
    assert capsys.readouterr().err.strip() == "python -m ctpo_lab.markov: interrupted"


def test_argparse_errors_use_the_shared_line(capsys):
    from ctpo_lab import cli

    p = cli.ArgumentParser(prog="x")
    p.add_argument("--n", type=cli.int_at_least(1), required=True)
    assert cli.run(lambda: p.parse_args(["--n", "0"]) and 0) == 2
    assert capsys.readouterr().err.strip() == "error: --n: expected an int ≥ 1, got 0"
    assert cli.run(lambda: p.parse_args([]) and 0) == 2
    assert capsys.readouterr().err.strip() == "error: --n: required"
    with pytest.raises(SystemExit) as e:  # outside cli.run: the same line, exit status 2
        p.parse_args(["--n", "x"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: --n: expected an int ≥ 1, got 'x'"


def case_counts() -> dict[str, int]:
    """Bad-input cases per entry point (reported when the contract changes)."""
    llm = [c for c in LLM_CASES]
    return {"python -m ctpo_lab": len(MAIN_CASES), "ctpo_lab.train": len(TRAIN_CASES),
            "ctpo_lab.train compare": len(COMPARE_CASES), "ctpo_lab.llm (run/analyze/fit/bias)": len(llm),
            "ctpo_lab.markov": len(MARKOV_CASES), "ctpo_lab.figures": len(FIGURES_CASES)}


EMPTY_OUT_CASES = [
    ("ctpo_lab.train.__main__", ["--preset", "cpu-tiny", "--no-progress"]),
    ("ctpo_lab.train.__main__", ["compare", "--preset", "cpu-tiny"]),
    ("ctpo_lab.train.__main__", ["main"]),
    ("ctpo_lab.train.__main__", ["regime", "--preset", "tiny"]),
    ("ctpo_lab.markov.__main__", ["--quick"]),
    ("ctpo_lab.diagnose.__main__", ["{d}/npz"]),
    ("ctpo_lab.figures.__main__", ["--quick"]),
    ("ctpo_lab.llm.__main__", ["run", "--model", "tiny-random"]),
    ("ctpo_lab.llm.__main__", ["bias", "--model", "tiny-random"]),
]


@pytest.mark.parametrize("module,argv", EMPTY_OUT_CASES, ids=[" ".join(c[1][:1]) or c[0] for c in EMPTY_OUT_CASES])
def test_empty_out_is_refused(module, argv, capsys, d, monkeypatch):
    """``--out ''`` would mean the current folder (here an empty one, which every command would accept as its
    output folder): refused, and nothing is written there."""
    import importlib

    (d / "cwd").mkdir()
    monkeypatch.chdir(d / "cwd")
    main = importlib.import_module(module).main
    _usage_error(capsys, main, [a.format(d=d) for a in argv] + ["--out", ""], "--out", [d])
