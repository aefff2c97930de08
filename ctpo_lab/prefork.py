"""Run ``python -m MODULE ARGS`` as a fork of a process that has already imported the heavy modules.

A grid of training runs starts one process per run so that runs never share state. Each fresh interpreter
spends several seconds importing torch and transformers before it trains (≈ 6 s of a 40 s run on a 2-core
machine), which a grid of 40 runs pays 40 times. A :class:`PreforkServer` is one helper process that imports
the modules once and then, for every request, forks a child that runs the module exactly as ``python -m``
would (:func:`runpy.run_module` with ``run_name="__main__"``), its stdout and stderr appended to a log file,
its exit status returned. One run per child, as before; only the imports are shared.

What a forked child shares with its siblings, unlike fresh interpreters: the modules imported at preload (no
state but import-time state), and the hash seed of ``str`` (Python's ``PYTHONHASHSEED``: a fresh interpreter
draws a new one; code whose numbers depend on set iteration order would already differ between two fresh
runs). The ``random`` and NumPy global generators are reseeded from the OS in every child, as in a fresh
interpreter. The server must be single-threaded when it forks; it checks this after preloading and refuses to
serve otherwise (the ``RuntimeError`` says why; a grid then starts plain subprocesses).

Only on Linux (``os.fork`` and ``prctl(PR_SET_PDEATHSIG)``): the server receives SIGTERM when its client
dies, and its children (started with ``$CTPO_LAB_PARENT_PID`` naming the server, see
:func:`ctpo_lab.runsafety.watch_parent`) receive SIGTERM when the server dies, so a killed grid still
checkpoints its runs.

Protocol (JSON lines over the server's stdin/stdout): first line ``{"preload": [module, ...]}``, answered by
``{"ready": true}`` or ``{"ready": false, "reason": ...}``; then one ``{"module", "argv", "log", "env"}``
request at a time, answered by ``{"rc": exit status}`` (negative: killed by that signal) when the child ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

__all__ = ["PreforkServer", "available"]


def available() -> bool:
    """Whether this platform can fork a pre-imported server (Linux with ``os.fork``)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


class PreforkServer:
    """One pre-imported server process; :meth:`run` one module at a time (calls from several threads wait for
    each other: start one server per parallel slot).

    ``preload``: modules imported once in the server; ``env``: the server's environment (its children inherit
    it, with each request's ``env`` on top). Variables read at import time (``OMP_NUM_THREADS`` …) must be set
    here. Raises ``RuntimeError`` if the server cannot start or is not single-threaded after preloading.
    """

    def __init__(self, preload: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        if not available():
            raise RuntimeError("prefork: needs Linux and os.fork")
        self._proc = subprocess.Popen([sys.executable, "-m", "ctpo_lab.prefork"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=dict(env if env is not None else os.environ),
                                      text=True, bufsize=1)
        self._lock = threading.Lock()
        reply = self._call({"preload": list(preload)})
        if not reply.get("ready"):
            self.close()
            raise RuntimeError(f"prefork: the server did not start ({reply.get('reason', 'no reply')})")

    @property
    def pid(self) -> int:
        """The server's process id (what its children's ``$CTPO_LAB_PARENT_PID`` should name)."""
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def _call(self, message: dict) -> dict:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            rc = self._proc.wait()
            return {"rc": rc if rc != 0 else 1, "reason": f"the server exited with status {rc}"}
        return json.loads(line)

    def run(self, module: str, argv: Sequence[str], log: str | os.PathLike[str],
            env: Mapping[str, str] | None = None) -> int:
        """Fork a child that runs ``python -m module *argv`` with stdout/stderr appended to ``log``; wait for it.

        Returns its exit status (``-N``: killed by signal N). If the server died, a line saying so is appended to
        ``log`` and its (non-zero) status is returned; the server is not restarted.
        """
        with self._lock:
            if not self.alive:
                reply = {"rc": self._proc.returncode or 1, "reason": "the server is not running"}
            else:
                reply = self._call({"module": module, "argv": [str(a) for a in argv], "log": str(log),
                                    "env": dict(env or {})})
        if "reason" in reply:
            with open(log, "a") as fh:
                fh.write(f"[ctpo_lab.prefork] {reply['reason']}\n")
        return int(reply["rc"])

    def close(self) -> None:
        """End the server (a running child is not waited for); idempotent."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> PreforkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------- the server
def _reply(fd: int, message: dict) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())


def _serve() -> dict | None:
    """The server's loop; returns the request a forked child must run, or None when the client is gone."""
    from ctpo_lab.runsafety import watch_parent

    # private copies of the request and reply pipes; fds 0 and 1 become /dev/null and stderr so that nothing
    # imported (or a child) can read a request or corrupt a reply
    requests = os.fdopen(os.dup(0), "r")
    replies = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the children and the client; the server waits
    watch_parent(poll=False)  # SIGTERM (default action: exit) when the client dies

    hello = json.loads(requests.readline() or "{}")
    try:
        import importlib

        for name in hello.get("preload", []):
            importlib.import_module(name)
    except Exception as e:  # a module that fails to import: the client falls back to plain processes
        _reply(replies, {"ready": False, "reason": f"preloading failed: {type(e).__name__}: {e}"})
        return None
    if threading.active_count() != 1:
        _reply(replies, {"ready": False, "reason": f"{threading.active_count()} threads after preloading"})
        return None
    _reply(replies, {"ready": True})

    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            os.close(replies)
            return request
        _, status = os.waitpid(pid, 0)
        _reply(replies, {"rc": os.waitstatus_to_exitcode(status)})
    return None


def _become(request: dict) -> None:
    """In a forked child: the environment, log, signals and generators of a fresh ``python -m`` process."""
    os.environ.update(request.get("env", {}))
    fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # ``random`` reseeds itself after a fork (os.register_at_fork); NumPy's legacy global generator does not
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    sys.argv = [request["module"], *request["argv"]]


def main() -> int:
    request = _serve()
    if request is None:
        return 0
    _become(request)
    import runpy

    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

