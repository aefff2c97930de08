"""Output folders that lose nothing: one exclusive writer, a marker, atomic files, validated reads.

Every command that writes a folder (``train``, ``train compare``, ``llm``, ``llm bias``, ``markov``, ``figures``)
goes through :func:`prepare_output`:

* **one writer**: an exclusive ``fcntl.flock`` on ``<folder>/.ctpo_lab.lock``, held for the life of the process
  (the kernel releases it on any exit, ``kill -9`` included); a second writer is refused with a ``ValueError``
  naming the holder's PID;
* **a marker**: ``<folder>/.ctpo_lab`` (JSON: ``created_by``, the command, the PID, the time) says ctpo_lab created
  the folder; ``overwrite`` empties only a marked folder, and never one another process holds; ``resume``
  continues only a marked folder (or an empty or missing one, which starts afresh);
* **atomic files**: :func:`atomic_write_text` / :func:`atomic_write_bytes` / :func:`atomic_path` write to a
  temporary name in the same folder, then ``os.replace`` it (a reader sees the old file or the new one);
  append-only logs (``metrics.jsonl``) are written one whole line per ``write`` and :func:`read_jsonl`
  drops a partial last line (what a crash mid-append leaves);
* **validated reads**: :func:`read_json`, :func:`read_jsonl`, :func:`read_yaml` raise ``ValueError`` naming the
  file and what is wrong with it.

Library code raises ``ValueError`` with messages ``<argument>: <what was expected>``; the command lines turn them
into one line ``error: ...`` and exit status 2 (:mod:`ctpo_lab.cli`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "MARKER",
    "LOCK",
    "FolderBusyError",
    "prepare_output",
    "lock_folder",
    "release_folder",
    "holder_pid",
    "is_marked",
    "write_marker",
    "check_writable",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_path",
    "read_json",
    "read_jsonl",
    "read_yaml",
    "check_entry",
    "watch_parent",
]

MARKER = ".ctpo_lab"
LOCK = ".ctpo_lab.lock"

#: folder (resolved) → open lock file of this process (kept open: the lock lives as long as the process)
_HELD: dict[Path, Any] = {}


class FolderBusyError(ValueError):
    """Another process holds the folder's lock."""


def _key(path: Path) -> Path:
    return Path(os.path.realpath(path))


def holder_pid(path: str | os.PathLike[str]) -> int | None:
    """PID of the process holding ``path``'s lock (this one included), or None when the folder is free."""
    import fcntl

    p = Path(path)
    if _key(p) in _HELD:
        return os.getpid()
    lock = p / LOCK
    if not lock.is_file():
        return None
    try:
        fh = lock.open("r+")
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(lock) or -1
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def _read_pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def lock_folder(path: str | os.PathLike[str], name: str = "out") -> None:
    """Take the exclusive lock of the existing folder ``path`` for the life of this process (idempotent).
    Raises :class:`FolderBusyError` naming the holder's PID."""
    import fcntl

    p = Path(path)
    key = _key(p)
    if key in _HELD:
        return
    fh = (p / LOCK).open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        pid = _read_pid(p / LOCK)
        raise FolderBusyError(
            f"{name}: {p} is in use by another ctpo_lab process (PID {pid if pid else 'unknown'}); wait for it "
            "to finish or stop it, or choose another folder") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    os.set_inheritable(fh.fileno(), False)
    _HELD[key] = fh


def release_folder(path: str | os.PathLike[str]) -> None:
    """Release this process's lock on ``path`` (for tests and long-lived library users; exiting releases it)."""
    fh = _HELD.pop(_key(Path(path)), None)
    if fh is not None:
        fh.close()


def marker_command(path: str | os.PathLike[str]) -> str | None:
    """The command that created ``path`` according to its marker (:func:`write_marker`: a JSON object with
    ``created_by: ctpo_lab``), or None when there is no such marker; a file of that name with any other content
    does not count, so ``overwrite`` never empties a folder on the strength of a stray file."""
    marker = Path(path) / MARKER
    try:
        if not marker.is_file() or marker.stat().st_size > 65536:
            return None
        data = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not (isinstance(data, dict) and data.get("created_by") == "ctpo_lab"):
        return None
    return str(data.get("command") or "")


def is_marked(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` carries ctpo_lab's marker (see :func:`marker_command`)."""
    return marker_command(path) is not None


def write_marker(path: str | os.PathLike[str], command: str) -> None:
    atomic_write_text(Path(path) / MARKER, json.dumps(
        {"created_by": "ctpo_lab", "command": command, "pid": os.getpid(), "time": time.time()}) + "\n")


def check_writable(path: str | os.PathLike[str], name: str = "out") -> None:
    """``ValueError`` unless ``path`` is (or can be created as) a writable folder; creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{name}: {p} exists and is not a directory")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{name}: cannot create {p}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write to {p} ({probe} is not writable)")
    if str(_key(probe)).startswith(("/proc", "/sys")):
        raise ValueError(f"{name}: cannot write to {p} (a kernel file system)")


def _nonempty(p: Path) -> bool:
    return p.is_dir() and any(e.name != LOCK for e in p.iterdir())


def prepare_output(
    path: str | os.PathLike[str],
    *,
    command: str,
    resume: bool = False,
    overwrite: bool = False,
    existing: str = "refuse",
    name: str = "out",
    check_only: bool = False,
    owners: tuple[str, ...] | None = None,
    resumable: bool = True,
) -> bool:
    """Make ``path`` this process's output folder: checked, created, locked and marked.

    ``existing`` says what a non-empty folder means without ``resume``/``overwrite``: ``"refuse"`` (a
    ``ValueError``), ``"update"`` (files are replaced in place: the repository's own figure gallery) or
    ``"update-own"`` (the same, for a folder one of ``owners`` created; any other is refused).  ``resume`` keeps
    the contents; ``overwrite`` empties the folder first.  Both (and ``"update-own"``) act only on a folder whose
    marker names one of ``owners`` (default: ``command`` itself), so one command never continues, replaces or
    writes into another's output, and never on one another process holds.  ``resumable``: whether the
    command has ``--resume`` (the refusal's hint names it only then).  With ``check_only`` nothing is created or
    locked (the read-only checks of a data-parallel rank > 0 or of a dry run).  Returns whether the folder held
    files before.
    """
    if resume and overwrite:
        raise ValueError("overwrite: --resume and --overwrite are mutually exclusive")
    p = Path(path)
    check_writable(p, name)
    pid = holder_pid(p) if p.is_dir() else None
    if pid is not None and pid != os.getpid():  # first: a running writer is the one thing to know
        raise FolderBusyError(f"{name}: {p} is in use by another ctpo_lab process (PID {pid}); wait for it to "
                              "finish or stop it, or choose another folder")
    if existing not in ("refuse", "update", "update-own"):
        raise ValueError(f"existing: expected 'refuse', 'update' or 'update-own', got {existing!r}")
    nonempty = _nonempty(p)
    acting = "--resume" if resume else "--overwrite" if overwrite else "writing" if existing == "update-own" else None
    if nonempty and acting is not None:
        made_by = marker_command(p)
        if made_by is None:
            what = {"--resume": "--resume continues", "--overwrite": "--overwrite deletes"}.get(acting,
                                                                                              "it writes into")
            raise ValueError(f"{name}: {p} was not created by ctpo_lab (no {MARKER} marker); {what} only "
                             "ctpo_lab's own folders: choose another folder")
        accepted = (command,) if owners is None else tuple(owners)
        if made_by not in accepted:
            raise ValueError(f"{name}: {p} holds the output of `{made_by}`, not of `{command}`; choose another folder "
                             "(remove it yourself to reuse the name)")
    if nonempty and not resume and not overwrite and existing == "refuse":
        how = "pass --resume to continue it or --overwrite to replace it" if resumable else \
            "pass --overwrite to replace it"
        raise ValueError(f"{name}: {p} already exists and is not empty; {how}, or choose another folder")
    if check_only:
        return nonempty
    p.mkdir(parents=True, exist_ok=True)
    lock_folder(p, name)
    if nonempty and overwrite:
        for entry in p.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    if not is_marked(p) and (not nonempty or overwrite):  # a resumed folder keeps what it is
        write_marker(p, command)
    return nonempty


# ---------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: ``tmp`` is renamed onto ``p`` when the block succeeds and
    removed when it fails. ``tmp`` is a hidden ``.<name>.XXXX.tmp`` (no glob of the real files matches it; give
    a format explicitly to writers that choose it by the suffix, e.g. ``savefig(tmp, format="png")``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


# ---------------------------------------------------------------------------------------------- validated reads
def read_json(path: str | os.PathLike[str], *, expect: type | None = dict, name: str | None = None) -> Any:
    """Parse a JSON file; ``ValueError`` naming the file when it is missing, unreadable, not JSON or not ``expect``."""
    p = Path(path)
    label = f"{name}: " if name else ""
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ValueError(f"{label}{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{label}{p}: cannot read it ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{label}{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); the file is "
                         "corrupt or truncated") from None
    if expect is not None and not isinstance(data, expect):
        raise ValueError(f"{label}{p}: expected a JSON {expect.__name__}, got {type(data).__name__}")
    return data


def read_jsonl(path: str | os.PathLike[str], *, name: str | None = None, warn: bool = True,
               step_key: str | None = None) -> list[dict[str, Any]]:
    """Records of a JSON-lines log. A partial last line (a crash mid-append) is dropped, saying so on stderr; any other
    bad line is a ``ValueError`` naming the file and the line.  ``step_key``: every record must hold this key with an
    int ≥ 0 (a training log's ``step``); a record without one is a bad line too."""
    p = Path(path)
    label = f"{name}: " if name else ""
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{label}{p}: cannot read it ({e})") from None
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as e:
            last = i == len(lines) - 1  # no newline after it: an interrupted append
            if last:
                if warn:
                    print(f"[ctpo_lab] {p}: dropped a partial last line (an interrupted write)", file=sys.stderr)
                break
            raise ValueError(f"{label}{p}: line {i + 1} is not a JSON record ({e}); the file is corrupt") from None
        if step_key is not None:
            v = rec.get(step_key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                got = repr(v) if step_key in rec else "a record without it"
                raise ValueError(f"{label}{p}: line {i + 1}: expected {step_key!r} to be an int ≥ 0, got {got}; the "
                                 "file is corrupt") from None
        records.append(rec)
    return records


def read_yaml(path: str | os.PathLike[str], *, name: str | None = None, allow_empty: bool = True) -> dict[str, Any]:
    """A YAML mapping (empty file: ``{}``, or with ``allow_empty=False`` a ``ValueError``: a file ctpo_lab wrote is
    never empty); ``ValueError`` naming the file when it is not one."""
    import yaml

    p = Path(path)
    label = f"{name}: " if name else ""
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{label}{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{label}{p}: cannot read it ({e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{label}{p}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        if not allow_empty:
            raise ValueError(f"{label}{p}: expected a YAML mapping of config keys, got an empty file; the file is "
                             "corrupt or truncated")
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{label}{p}: expected a YAML mapping of config keys, got {type(data).__name__}")
    return data


def check_entry(path: str | os.PathLike[str], kind: str, *, name: str | None = None) -> None:
    """``ValueError`` naming ``path`` when it exists but is not a ``kind`` (``"file"``: a regular file, ``"dir"``: a
    folder; symbolic links followed, a broken one refused). A missing ``path`` is fine."""
    import stat

    if kind not in ("file", "dir"):
        raise ValueError(f"kind: expected 'file' or 'dir', got {kind!r}")
    p = Path(path)
    label = f"{name}: " if name else ""
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        if p.is_symlink():
            raise ValueError(f"{label}{p}: expected a {'regular file' if kind == 'file' else 'folder'}, found a broken "
                             "symbolic link") from None
        return
    except OSError as e:
        raise ValueError(f"{label}{p}: cannot read it ({e.strerror or e})") from None
    if (stat.S_ISREG(mode) if kind == "file" else stat.S_ISDIR(mode)):
        return
    found = ("a folder" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode) else
             "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device file")
    raise ValueError(f"{label}{p}: expected a {'regular file' if kind == 'file' else 'folder'}, found {found}")


# ---------------------------------------------------------------------------------------------- child processes
PARENT_ENV = "CTPO_LAB_PARENT_PID"


def watch_parent(*, poll: bool = True) -> None:
    """In a worker started by a grid (``$CTPO_LAB_PARENT_PID`` set): receive SIGTERM when the parent dies
    (``prctl(PR_SET_PDEATHSIG)`` on Linux, and a polling thread); the trainer then checkpoints and exits.

    ``poll=False``: no thread (a process that will fork must stay single-threaded; Linux's prctl alone then)."""
    import signal
    import threading

    raw = os.environ.get(PARENT_ENV)
    if not raw:
        return
    try:
        parent = int(raw)
    except ValueError:
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the call above
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if not poll:
        return

    def poll_parent() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=poll_parent, name="ctpo_lab-parent-watch", daemon=True).start()
