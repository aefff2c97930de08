"""Pre-imported worker processes: a forked child behaves as ``python -m MODULE`` would, and a grid's runs give
the same numbers through them as through fresh interpreters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ctpo_lab import compare, prefork
from ctpo_lab.runsafety import PARENT_ENV

pytestmark = pytest.mark.skipif(not prefork.available(), reason="pre-imported workers need Linux and os.fork")

MODULE = textwrap.dedent("""
    import json, os, random, sys
    import numpy
    mode = sys.argv[1]
    print(json.dumps({"argv": sys.argv[1:], "name": __name__, "env": os.environ.get("PREFORK_TEST_VAR"),
                      "ppid": os.getppid(), "pid": os.getpid(), "preloaded": "ctpo_lab.stats" in sys.modules,
                      "random": random.random(), "numpy_random": numpy.random.random()}), flush=True)
    if mode == "exit":
        sys.exit(int(sys.argv[2]))
    if mode == "raise":
        raise ValueError("boom from the child")
    if mode == "kill":
        os.kill(os.getpid(), 9)
    if mode == "stdin":
        print(repr(sys.stdin.read()), flush=True)
""")


@pytest.fixture
def server(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "prefork_probe.py").write_text(MODULE)
    # an import that draws from NumPy's global generator (its state is then copied into every fork)
    (tmp_path / "pkg" / "prefork_draws.py").write_text("import numpy\nnumpy.random.random()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "pkg"), os.environ.get("PYTHONPATH", "")]))
    with prefork.PreforkServer(["ctpo_lab.stats", "prefork_draws"], env=env) as s:
        yield s


def _records(log):
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_child_runs_the_module_as_python_m_would(server, tmp_path):
    log = tmp_path / "a.log"
    assert server.run("prefork_probe", ["exit", "7"], log, env={"PREFORK_TEST_VAR": "x"}) == 7
    assert server.run("prefork_probe", ["exit", "0"], log) == 0
    first, second = _records(log)  # appended, not overwritten
    assert first["argv"] == ["exit", "7"] and first["name"] == "__main__"
    assert first["env"] == "x" and second["env"] is None  # a request's environment does not leak into the next
    assert first["ppid"] == server.pid and first["pid"] != second["pid"]  # one fresh fork per run
    assert first["preloaded"]  # the module was imported before the fork
    # the global generators are reseeded per child, as in a fresh interpreter
    assert first["random"] != second["random"] and first["numpy_random"] != second["numpy_random"]


def test_failures_reach_the_client(server, tmp_path):
    log = tmp_path / "b.log"
    assert server.run("prefork_probe", ["raise"], log) == 1
    text = log.read_text()
    assert "Traceback" in text and "ValueError: boom from the child" in text  # stderr goes to the log too
    assert server.run("prefork_probe", ["kill"], log) == -signal.SIGKILL
    assert server.run("prefork_probe", ["stdin"], log) == 0
    assert log.read_text().splitlines()[-1] == "''"  # the child's stdin is empty, never the request pipe
    assert server.run("no_such_module_here", [], log) == 1
    assert "No module named no_such_module_here" in log.read_text()
    assert server.alive  # a child's failure never takes the server down


def test_a_failed_preload_is_reported():
    with pytest.raises(RuntimeError, match="preloading failed: ModuleNotFoundError"):
        prefork.PreforkServer(["no_such_module_here"])


def test_children_stop_when_the_client_dies(tmp_path, sigterm_probe):
    """kill -9 of the client: the server gets SIGTERM (PR_SET_PDEATHSIG), then its running child does."""
    flag = tmp_path / "got_sigterm"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "prefork_sleeper.py").write_text(sigterm_probe(flag))
    log = tmp_path / "sleeper.log"
    client = textwrap.dedent(f"""
        import os, sys
        from ctpo_lab.prefork import PreforkServer
        env = dict(os.environ, {PARENT_ENV}=str(os.getpid()), PYTHONPATH={str(tmp_path / "pkg")!r})
        s = PreforkServer([], env=env)
        print(s.pid, flush=True)
        s.run("prefork_sleeper", [], {str(log)!r}, env={{"{PARENT_ENV}": str(s.pid)}})
    """)
    p = subprocess.Popen([sys.executable, "-c", client], stdout=subprocess.PIPE, text=True)
    server_pid = int(p.stdout.readline())
    deadline = time.time() + 30
    while "ready" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.1)
    assert "ready" in log.read_text()
    p.kill()
    p.wait()
    deadline = time.time() + 20
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert flag.exists(), "the running child did not get SIGTERM when the grid's process died"
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(server_pid, 0)
            time.sleep(0.1)


def test_grid_runs_give_the_numbers_fresh_interpreters_give(tmp_path, monkeypatch, capsys):
    from ctpo_lab.train.loop import TIMING_KEYS

    monkeypatch.setenv("CTPO_LAB_CACHE", str(tmp_path / "cache"))
    spec = compare.GridSpec("cpu-tiny", ("ctpo",), (3,), steps=2)

    def records(prefork_on: str):
        monkeypatch.setenv(compare.PREFORK_ENV, prefork_on)
        paths = compare.run_grid(spec, tmp_path / f"grid{prefork_on}", jobs=1, progress=False)
        rows = [json.loads(x) for x in (paths[("ctpo", 3)] / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in rows]

    forked = records("1")
    assert "plain processes" not in capsys.readouterr().err  # the runs did go through a pre-imported worker
    fresh = records("0")
    assert len(forked) >= 2 and forked == fresh
