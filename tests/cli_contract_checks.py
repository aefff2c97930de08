"""Checks shared by the command-line contract tests: a refused input exits 2 with one ``error:`` line naming the
argument (or file), prints no traceback and leaves every file as it was."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


def tree(*roots: Path, skip: Iterable[str] = ()) -> dict[str, tuple[int, int]]:
    """Every folder and file under ``roots`` with the files' (size, mtime in ns); file names in ``skip`` left out
    (a lock file the command rewrites whenever it takes the lock)."""
    skipped = set(skip)
    out = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            out[dirpath] = (0, 0)
            # links are recorded as links (lstat): a broken one is an entry too
            for f in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
                if f in skipped:
                    continue
                st = (Path(dirpath) / f).lstat()
                out[str(Path(dirpath) / f)] = (st.st_size, st.st_mtime_ns)
    return out


def usage_error(capsys, main: Callable[[list[str]], int], argv: Sequence[object], names: str | Sequence[str],
                roots: Sequence[Path], *, every_name: bool = False, skip: Iterable[str] = ()) -> str:
    """Run ``main(argv)`` in-process and check the contract; the error line is returned.

    The line must start with ``error: <name>`` or mention `` <name>`` for one of ``names`` (with ``every_name``:
    contain each of them), and nothing under ``roots`` may be written or changed."""
    skip = tuple(skip)
    before = tree(*roots, skip=skip)
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("Loading weights")]
    assert rc == 2, (argv, rc, err[-800:])
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    names = (names,) if isinstance(names, str) else tuple(names)
    if every_name:
        for n in names:
            assert n in lines[0], (n, lines[0])
    else:
        assert any(lines[0].startswith(f"error: {n}") or f" {n}" in lines[0] for n in names), (names, lines[0])
    assert tree(*roots, skip=skip) == before, f"{argv} wrote or changed files"
    return lines[0]
