"""Nothing lost: one writer per folder, markers, atomic files, validated reads, checkpoints that fall
back, finished runs left alone, SIGTERM, and grid workers that stop with their parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctpo_lab import runsafety as rs

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CTPO_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def held(tmp_path):
    """A folder created, marked and locked by another process (as a running command would)."""
    folder = tmp_path / "busy"
    code = textwrap.dedent(f"""
        import sys, time
        from ctpo_lab.runsafety import prepare_output
        prepare_output({str(folder)!r}, command="test holder")
        open({str(folder / "metrics.jsonl")!r}, "w").write('{{"step": 0}}\\n')
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield folder, proc.pid
    proc.kill()
    proc.wait()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------- one writer
def test_second_writer_is_refused_naming_the_pid(held):
    folder, pid = held
    assert rs.holder_pid(folder) == pid
    for kwargs in ({}, {"resume": True}, {"overwrite": True}, {"existing": "update"}):
        with pytest.raises(rs.FolderBusyError, match=f"PID {pid}"):
            rs.prepare_output(folder, command="test", **kwargs)
    assert (folder / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_every_command_refuses_a_busy_folder(held, capsys):
    """train (run, --resume, --overwrite), compare, llm, llm bias, markov and figures: exit 2, the holder's PID,
    the folder untouched (``--overwrite`` never deletes a folder a running process holds)."""
    from ctpo_lab.figures.__main__ import main as figures
    from ctpo_lab.llm.__main__ import main as llm
    from ctpo_lab.markov.__main__ import main as markov
    from ctpo_lab.train.__main__ import main as train

    folder, pid = held
    before = _tree(folder)
    tiny = ["--preset", "cpu-tiny", "--no-progress", "--out", str(folder)]
    calls = [
        (train, tiny), (train, [*tiny, "--resume"]), (train, [*tiny, "--overwrite"]),
        (train, ["compare", "--preset", "cpu-tiny", "--out", str(folder), "--overwrite"]),
        (llm, ["--out", str(folder), "--quick", "--overwrite"]),
        (llm, ["bias", "--out", str(folder), "--quick", "--overwrite"]),
        (markov, ["--out", str(folder), "--quick", "--overwrite"]),
        (figures, ["--out", str(folder), "--quick", "--only", "markov"]),
    ]
    for main, argv in calls:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"PID {pid}" in err[0] and "in use" in err[0], (argv, err)
    assert _tree(folder) == before


def test_the_lock_is_released_when_the_holder_dies(tmp_path):
    folder = tmp_path / "f"
    code = f"from ctpo_lab.runsafety import prepare_output; prepare_output({str(folder)!r}, command='test')"
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True)  # exits without releasing explicitly
    assert rs.holder_pid(folder) is None
    rs.prepare_output(folder, command="test", overwrite=True)  # a marked folder nobody holds: replaced
    assert rs.holder_pid(folder) == os.getpid()
    rs.release_folder(folder)


@pytest.mark.slow
def test_two_trainers_on_one_folder(tmp_path, capsys):
    """A real running trainer: a second one (plain, --resume, --overwrite) is refused; the first one's log is
    one record per step."""
    from ctpo_lab.train.__main__ import main

    out = tmp_path / "run"
    argv = ["--preset", "cpu-tiny", "--loss", "ctpo", "--no-progress", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "ctpo_lab.train", *argv, "--steps", "12"], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while rs.holder_pid(out) is None and time.time() < deadline:
        time.sleep(0.2)
    assert rs.holder_pid(out) == first.pid
    for extra in ([], ["--resume"], ["--overwrite"]):
        capsys.readouterr()
        assert main([*argv, *extra]) == 2
        assert f"PID {first.pid}" in capsys.readouterr().err
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(13))


# ------------------------------------------------------------------------------------------- marker
def test_overwrite_needs_the_marker(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not created by ctpo_lab"):
        rs.prepare_output(user, command="test", overwrite=True)
    assert (user / "mine.txt").read_text() == "keep me" and not (user / rs.LOCK).exists()
    ours = tmp_path / "ours"
    rs.prepare_output(ours, command="test")
    (ours / "old.txt").write_text("old")
    rs.prepare_output(ours, command="test", overwrite=True)
    assert sorted(p.name for p in ours.iterdir()) == sorted([rs.MARKER, rs.LOCK])
    assert json.loads((ours / rs.MARKER).read_text())["created_by"] == "ctpo_lab"
    rs.release_folder(ours)


# ------------------------------------------------------------------------------------------- atomic writes, reads
def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    f = tmp_path / "a.json"
    rs.atomic_write_text(f, "old")
    with pytest.raises(RuntimeError):
        with rs.atomic_path(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_readers_name_the_file_and_the_problem(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"a": 1')
    with pytest.raises(ValueError, match=r"x\.json: not valid JSON"):
        rs.read_json(bad)
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="expected a JSON dict"):
        rs.read_json(tmp_path / "list.json")
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "x')
    assert [r["step"] for r in rs.read_jsonl(log)] == [0, 1]
    assert "dropped a partial last line" in capsys.readouterr().err
    log.write_text('{"step": 0}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl: line 2"):
        rs.read_jsonl(log)
    y = tmp_path / "c.yaml"
    y.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match=r"c\.yaml: not valid YAML"):
        rs.read_yaml(y)
    y.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        rs.read_yaml(y)


def test_unwritable_outputs_are_refused_before_anything_is_created(tmp_path):
    for path in ("/proc/ctpo_lab_x", str(tmp_path / "f" / "sub")):
        (tmp_path / "f").write_text("a file")
        with pytest.raises(ValueError, match="out: "):
            rs.check_writable(path)


def test_truncated_shard_is_not_done(tmp_path, capsys):
    from ctpo_lab.llm import store

    table = pa.table({"chunk": pa.array([0, 0], pa.int32())})
    pq.write_table(table, store.shard_path(tmp_path, 0))
    pq.write_table(pa.table({"chunk": pa.array([1, 1], pa.int32())}), store.shard_path(tmp_path, 1))
    data = store.shard_path(tmp_path, 1).read_bytes()
    store.shard_path(tmp_path, 1).write_bytes(data[: len(data) // 2])  # killed while copying, disk full, ...
    assert store.done_chunks(tmp_path) == {0}
    assert "shard_00001.parquet is incomplete or corrupt" in capsys.readouterr().err
    assert store.done_chunks(tmp_path) == {0} and (tmp_path / "shard_00001.parquet.corrupt").is_file()
    with pytest.raises(ValueError, match=r"shard_00000\.parquet lacks the trajectory column"):
        store.read_parquet(store.shard_path(tmp_path, 0))


def test_grid_metrics_with_a_partial_last_line_load(tmp_path):
    from ctpo_lab import compare

    run = compare.run_dir(tmp_path, "grpo", 0)
    run.mkdir(parents=True)
    (tmp_path / "grid.json").write_text(json.dumps({"losses": ["grpo"], "seeds": [0]}))
    (run / "metrics.jsonl").write_text('{"step": 0, "eval_accuracy": 0.1}\n{"step": 1, "eval_accuracy": 0.2}\n'
                                       '{"step": 2, "eval_')
    df = compare.load_grid(tmp_path)
    assert list(df["step"]) == [0, 1] and isinstance(df, pd.DataFrame)


# ------------------------------------------------------------------------------------------- the trainer
def tiny(**over):
    from ctpo_lab.train.config import resolve_train_config

    return resolve_train_config("cpu-tiny", overrides=[f"{k}={v}" for k, v in over.items()], loss="ctpo")


def test_corrupt_newest_checkpoint_falls_back_and_bad_config_is_named(tmp_path, capsys):
    from ctpo_lab.train.loop import Trainer

    out = tmp_path / "run"
    part = Trainer(tiny(steps=3, ckpt_every=1), out, progress=False).train(interrupt_after=2)
    assert part.interrupted
    ckpts = sorted((out / "ckpt").glob("step_*.pt"))
    assert [p.name for p in ckpts] == ["step_0000001.pt", "step_0000002.pt"]
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[: len(data) // 3])  # a truncated newest checkpoint
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "rew')  # and a partial last log line
    capsys.readouterr()
    resumed = Trainer(tiny(steps=3, ckpt_every=1), out, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "step_0000002.pt is unreadable" in err and "falling back to" in err and "step_0000001.pt" in err
    assert resumed.start_step == 1
    resumed.train()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    for p in (out / "ckpt").glob("step_*.pt"):
        p.write_bytes(b"garbage")
    (out / "finished.json").unlink()
    with pytest.raises(ValueError, match="no readable checkpoint"):
        Trainer(tiny(steps=3, ckpt_every=1), out, resume=True, progress=False)
    (out / "config.yaml").write_text("lr: [1,\n")
    with pytest.raises(ValueError, match=r"config\.yaml: not valid YAML"):
        Trainer(tiny(steps=3, ckpt_every=1), out, resume=True, progress=False)


def test_resume_refuses_a_folder_it_cannot_continue_and_writes_nothing(tmp_path):
    from ctpo_lab.train.loop import Trainer

    user = tmp_path / "user"  # not a ctpo_lab folder
    user.mkdir()
    (user / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not created by ctpo_lab"):
        Trainer(tiny(steps=1), user, resume=True, progress=False)
    assert sorted(p.name for p in user.iterdir()) == ["mine.txt"]
    stray = tmp_path / "stray"  # a file named like the marker but not written by ctpo_lab
    stray.mkdir()
    (stray / rs.MARKER).write_text("garbage marker")
    (stray / "mine.txt").write_text("keep me")
    assert not rs.is_marked(stray)
    with pytest.raises(ValueError, match="not created by ctpo_lab"):
        Trainer(tiny(steps=1), stray, overwrite=True, progress=False)
    assert (stray / "mine.txt").read_text() == "keep me"

    out = tmp_path / "run"
    Trainer(tiny(steps=2, ckpt_every=1), out, progress=False).train()
    (out / "finished.json").unlink()
    files = {n: (out / n).read_bytes() for n in ("config.yaml", "metrics.jsonl")}

    def unchanged() -> bool:
        return all((out / n).read_bytes() == b for n, b in files.items())

    lines = files["metrics.jsonl"].decode().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "garbage{", *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not a JSON record"):
        Trainer(tiny(steps=3, ckpt_every=1), out, resume=True, progress=False)
    assert (out / "config.yaml").read_bytes() == files["config.yaml"]  # refused before config.yaml is rewritten
    (out / "metrics.jsonl").write_bytes(files["metrics.jsonl"])
    # config.yaml cut short (no lr) while the run asks for another lr: the checkpoint's own config decides
    kept = [x for x in files["config.yaml"].decode().splitlines() if not x.startswith("lr:")]
    (out / "config.yaml").write_text("\n".join(kept) + "\n")
    with pytest.raises(ValueError, match=r"newest checkpoint's config in \['lr'\]"):
        Trainer(tiny(steps=3, ckpt_every=1, lr=1e-2), out, resume=True, progress=False)
    (out / "config.yaml").write_bytes(files["config.yaml"])
    with pytest.raises(ValueError, match=r"^steps: the run in .* is at step 2 already; pass --steps 2 or more"):
        Trainer(tiny(steps=1, ckpt_every=1), out, resume=True, progress=False)
    for ck in (out / "ckpt").glob("step_*.pt"):  # logged steps 1..2 but nothing to continue from
        ck.unlink()
    with pytest.raises(ValueError, match="no checkpoint to continue from, but metrics.jsonl logs steps up to 2"):
        Trainer(tiny(steps=3, ckpt_every=1), out, resume=True, progress=False)
    assert unchanged()


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    from ctpo_lab.train.__main__ import main
    from ctpo_lab.train.loop import Trainer

    out = tmp_path / "run"
    Trainer(tiny(steps=2), out, progress=False).train()
    finished = json.loads((out / "finished.json").read_text())
    assert finished["final"]["step"] == 2
    before = _tree(out)
    result = Trainer(tiny(steps=2), out, resume=True, progress=False).train()
    assert result.finished and result.final["step"] == 2 and not result.history
    capsys.readouterr()
    assert main(["--preset", "cpu-tiny", "--loss", "ctpo", "--out", str(out), "--resume", "--no-progress",
                 "steps=2"]) == 0
    assert "finished run" in capsys.readouterr().err
    assert _tree(out) == before
    extended = Trainer(tiny(steps=3), out, resume=True, progress=False).train()  # more steps: it continues
    assert not extended.finished and extended.final["step"] == 3


def test_sigterm_checkpoints_like_ctrl_c(tmp_path, monkeypatch):
    from ctpo_lab.train.loop import Trainer

    trainer = Trainer(tiny(steps=5, ckpt_every=100), tmp_path / "run", progress=False)
    real_step = trainer.train_step

    def step_then_sigterm(step):
        rec = real_step(step)
        if step == 2:
            signal.raise_signal(signal.SIGTERM)  # what a cluster scheduler (or a dying grid parent) sends
        return rec

    monkeypatch.setattr(trainer, "train_step", step_then_sigterm)
    result = trainer.train()
    assert result.interrupted and result.history[-1]["step"] == 2
    assert [p.name for p in trainer.run.checkpoints()] == ["step_0000002.pt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_grid_workers_stop_when_their_parent_dies(tmp_path, sigterm_probe):
    flag = tmp_path / "got_sigterm"
    child = sigterm_probe(flag)
    parent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = dict(os.environ, {rs.PARENT_ENV}=str(os.getpid()))
        c = subprocess.Popen([sys.executable, "-c", {child!r}], env=env, stdout=subprocess.PIPE, text=True)
        assert c.stdout.readline().strip() == "ready"
        print(c.pid, flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", parent], env=ENV, stdout=subprocess.PIPE, text=True)
    child_pid = int(p.stdout.readline())
    p.kill()  # kill -9: the parent gets no chance to stop its workers
    p.wait()
    deadline = time.time() + 20
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert flag.exists(), "the worker did not get SIGTERM when its parent died"
    try:
        os.kill(child_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
