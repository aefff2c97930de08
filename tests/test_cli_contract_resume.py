"""``python -m ctpo_lab.train --resume`` on a damaged run folder: one line ``error: ...`` naming the file, exit 2, no
traceback, and nothing built or written (the contract of README, "Command-line contract and run folders").

One tiny finished run (cpu-tiny, 2 steps) is trained once per module and copied per case; every case runs in-process
with the model loader replaced by one that fails the test, so "before the model is built" is checked exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_contract_checks import usage_error

from ctpo_lab.runsafety import LOCK

RUN = ["--preset", "cpu-tiny", "--loss", "ctpo", "--no-progress"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CTPO_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished 2-step cpu-tiny run (checkpoints and ratio dumps at steps 1 and 2), made by the CLI itself."""
    from ctpo_lab.runsafety import release_folder
    from ctpo_lab.train.__main__ import main

    out = tmp_path_factory.mktemp("resume-base") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTPO_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        assert main([*RUN, "--steps", "2", "--out", str(out)]) == 0
    release_folder(out)
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step_0000001.pt", "step_0000002.pt"]
    assert (out / "finished.json").is_file() and (out / "metrics.jsonl").is_file()
    return out


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A private copy of the finished run."""
    dst = tmp_path / "run"
    shutil.copytree(base, dst, symlinks=True)
    return dst


@pytest.fixture(autouse=True)
def _no_model(monkeypatch):
    """Building the model means the refusal came too late."""
    from ctpo_lab.train import loop

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the run folder was refused")

    monkeypatch.setattr(loop, "load_policy", built)


def _usage_error(capsys, run: Path, extra: list[str], name: str) -> str:
    """Exit 2, exactly one stderr line ``error: ...`` naming ``name``, no traceback, the folder unchanged (its lock
    file, rewritten by whoever takes it, aside)."""
    from ctpo_lab.train.__main__ import main

    return usage_error(capsys, main, [*RUN, "--out", run, "--resume", *extra], name, [run], every_name=True,
                       skip=(LOCK,))


# ------------------------------------------------------------------------------------------- finished.json
FINISHED_CASES = [
    ('{"steps": Infinity}', "'steps'"),
    ('{"steps": NaN}', "'steps'"),
    ('{"steps": "abc"}', "'steps'"),
    ('{"steps": [2]}', "'steps'"),
    ('{"steps": -1}', "'steps'"),
    ('{"steps": true}', "'steps'"),
    ('{"final": {}}', "'steps'"),
    ('{"steps": 2, "final": [1, 2]}', "'final'"),
    ('{"steps": 2, "wall_time": -Infinity}', "'wall_time'"),
]


@pytest.mark.parametrize("text,field", FINISHED_CASES, ids=[c[0] for c in FINISHED_CASES])
@pytest.mark.parametrize("steps", ["2", "3"])
def test_a_corrupt_finished_json_is_named(text, field, steps, run, capsys):
    (run / "finished.json").write_text(text)
    line = _usage_error(capsys, run, ["--steps", steps], "finished.json")
    assert field in line


# ------------------------------------------------------------------------------------------- entry types
def _dir_instead(name):
    def mutate(run: Path) -> None:
        p = run / name
        p.unlink()
        p.mkdir()
        (p / "inside").write_text("x")
    return mutate


def _file_instead(name):
    def mutate(run: Path) -> None:
        p = run / name
        if p.is_dir():
            shutil.rmtree(p)
        p.write_text("a file\n")
    return mutate


ENTRY_CASES = [
    ("metrics.jsonl-dir", _dir_instead("metrics.jsonl"), [], "metrics.jsonl"),
    ("config.yaml-dir", _dir_instead("config.yaml"), [], "config.yaml"),
    ("finished.json-dir", _dir_instead("finished.json"), [], "finished.json"),
    ("ckpt-file", _file_instead("ckpt"), [], "ckpt"),
    ("ratios-file", _file_instead("ratios"), [], "ratios"),
    ("tb-file", _file_instead("tb"), ["tensorboard=true"], "tb"),
    ("checkpoint-dir", _dir_instead("ckpt/step_0000002.pt"), [], "step_0000002.pt"),
    ("metrics.jsonl-broken-link", lambda r: ((r / "metrics.jsonl").unlink(),
                                             (r / "metrics.jsonl").symlink_to(r / "nowhere")), [], "metrics.jsonl"),
]


@pytest.mark.parametrize("mutate,extra,name", [c[1:] for c in ENTRY_CASES], ids=[c[0] for c in ENTRY_CASES])
@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
def test_a_run_folder_entry_of_the_wrong_type_is_refused_up_front(mutate, extra, name, finished, run, capsys):
    if not finished and name != "finished.json":
        (run / "finished.json").unlink()
    mutate(run)
    line = _usage_error(capsys, run, ["--steps", "3", *extra], name)
    assert "expected a" in line


# ------------------------------------------------------------------------------------------- config.yaml
@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"], ids=["0-byte", "newline", "comment"])
@pytest.mark.parametrize("steps,finished", [("2", True), ("3", True), ("3", False)])
def test_an_empty_config_yaml_is_corrupt(text, steps, finished, run, capsys):
    if not finished:
        (run / "finished.json").unlink()
    (run / "config.yaml").write_text(text)
    line = _usage_error(capsys, run, ["--steps", steps], "config.yaml")
    assert "empty" in line


# ------------------------------------------------------------------------------------------- metrics.jsonl
@pytest.mark.parametrize("record", ['{"step": "5"}', '{"step": Infinity}', '{"step": -1}', '{"step": 1.5}',
                                    '{"step": null}', '{"reward_mean": 0.5}'])
@pytest.mark.parametrize("checkpoints", [False, True], ids=["no-checkpoint", "checkpoints"])
def test_a_metrics_record_without_an_int_step_is_corrupt(record, checkpoints, run, capsys):
    (run / "finished.json").unlink()
    if not checkpoints:
        shutil.rmtree(run / "ckpt")
    with (run / "metrics.jsonl").open("a") as f:
        f.write(record + "\n")
    line = _usage_error(capsys, run, ["--steps", "3"], "metrics.jsonl")
    assert "'step'" in line


# ------------------------------------------------------------------------------------------- checkpoints
def test_no_readable_checkpoint_is_one_line_without_a_fallback_notice(run, capsys):
    (run / "finished.json").unlink()
    for p in (run / "ckpt").glob("step_*.pt"):
        p.write_bytes(b"garbage")
    line = _usage_error(capsys, run, ["--steps", "3"], "step_0000001.pt")
    assert "no readable checkpoint" in line and "step_0000002.pt" in line


def test_a_fallback_notice_names_the_checkpoint_actually_loaded(run, capsys):
    from ctpo_lab.train.runfolder import RunFolder

    ckpt = run / "ckpt"
    (ckpt / "step_0000003.pt").write_bytes(b"garbage")  # two unreadable newer ones: both fall back to step 1
    data = (ckpt / "step_0000002.pt").read_bytes()
    (ckpt / "step_0000002.pt").write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    state = RunFolder(run, writer=False).load_checkpoint()
    assert state["step"] == 1
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 2, notices
    assert all("falling back to" in n and n.endswith(str(ckpt / "step_0000001.pt")) for n in notices), notices
    assert "step_0000003.pt is unreadable" in notices[0] and "step_0000002.pt is unreadable" in notices[1]


# ------------------------------------------------------------------------------------------- the readers
def test_readers_refuse_what_a_run_folder_never_holds(tmp_path):
    from ctpo_lab import runsafety as rs

    y = tmp_path / "config.yaml"
    y.write_text("")
    assert rs.read_yaml(y) == {}  # a recipe may be empty
    with pytest.raises(ValueError, match=r"config\.yaml: expected a YAML mapping .* empty file"):
        rs.read_yaml(y, allow_empty=False)
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0}\n{"step": 1}\n{"step": "2"}\n')
    assert len(rs.read_jsonl(log)) == 3
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 3: expected 'step' to be an int ≥ 0, got '2'"):
        rs.read_jsonl(log, step_key="step")
    log.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "x')  # a partial last line is still dropped
    assert [r["step"] for r in rs.read_jsonl(log, step_key="step", warn=False)] == [0, 1]
    rs.check_entry(tmp_path / "missing", "file")
    rs.check_entry(log, "file")
    rs.check_entry(tmp_path, "dir")
    with pytest.raises(ValueError, match=r"resume: .*metrics\.jsonl: expected a folder, found a regular file"):
        rs.check_entry(log, "dir", name="resume")
    with pytest.raises(ValueError, match=r"expected a regular file, found a folder"):
        rs.check_entry(tmp_path, "file")
