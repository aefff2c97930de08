"""The one command-line contract of every ``python -m ctpo_lab...`` entry point.

* a user error (bad flag, bad value, corrupt input, busy folder) prints one line ``error: <argument>: <what was
  expected>`` on stderr and exits with status 2 — argparse's own errors included (:class:`ArgumentParser`);
* Ctrl-C prints one line and exits with status 130;
* values are validated when parsed (:func:`finite_float`, :func:`int_at_least`), before any work starts.

Library functions raise ``ValueError``/``TypeError`` whose message starts with the argument's name; :func:`run`
turns them into the line above, showing a known option name as its flag (``max_new_tokens`` → ``--max-new-tokens``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Mapping

from ctpo_lab.allocator import retain_freed_memory

__all__ = ["ArgumentParser", "UsageError", "finite_float", "int_at_least", "folder_path", "error_line", "run",
           "EXIT_USAGE",
           "EXIT_INTERRUPTED", "MAX_INT", "MAX_COUNT",
           "exception_summary", "consecutive_seeds"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Raised by :meth:`ArgumentParser.error`; :func:`run` prints it as one line and returns 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the shared error contract: ``error: <argument>: <message>`` (one line), exit status 2.

    ``error`` raises :class:`UsageError` (caught by :func:`run`); outside :func:`run` it prints the line and
    exits with status 2 itself."""

    def error(self, message: str) -> None:  # type: ignore[override]
        text = " ".join(message.split())
        if text.startswith("argument "):  # "argument --seed: invalid int value: 'x'" → "--seed: ..."
            text = text[len("argument "):]
            head, sep, rest = text.partition(": ")
            if sep and "/" in head:  # "--loss/--losses" → "--loss"
                text = f"{head.split('/')[0]}: {rest}"
        elif text.startswith("the following arguments are required: "):
            names = text[len("the following arguments are required: "):]
            text = f"{names.split(', ')[0].split('/')[0]}: required"
        elif text.startswith("unrecognized arguments: "):
            text = f"{text[len('unrecognized arguments: '):].split()[0]}: unrecognized argument"
        if _IN_RUN:
            raise UsageError(text)
        print(f"error: {text}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


_IN_RUN: list[bool] = []


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite float in [lo, hi] (open ends with ``lo_open`` / ``hi_open``)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (
            hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            rng = []
            if lo is not None:
                rng.append(f"{'>' if lo_open else '≥'} {lo:g}")
            if hi is not None:
                rng.append(f"{'<' if hi_open else '≤'} {hi:g}")
            raise argparse.ArgumentTypeError(f"expected a finite number{' ' + ' and '.join(rng) if rng else ''}, "
                                              f"got {text!r}")
        return v

    parse.__name__ = "number"
    return parse


#: The largest int any option takes (seeds and counts reach torch and numpy as signed 64-bit ints).
MAX_INT = 2**63 - 1
#: The largest count (steps, prompts, batch sizes, tokens, replicates, ...) a config takes: beyond it, a typo.
MAX_COUNT = 2**31 - 1


def int_at_least(lo: int, hi: int = MAX_INT) -> Callable[[str], int]:
    """An argparse ``type``: an int in [``lo``, ``hi``]."""

    def parse(text: str) -> int:
        expected = f"an int ≥ {lo}" if hi == MAX_INT else f"an int in [{lo}, {hi}]"
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {v}")
        if v > hi:
            raise argparse.ArgumentTypeError(
                f"expected {expected if hi != MAX_INT else f'an int in [{lo}, 2**63 - 1]'}, got {v}")
        return v

    parse.__name__ = "int"
    return parse


def folder_path(text: str) -> str:
    """An argparse ``type`` for an output folder: a non-empty path (``''`` would silently mean the current
    folder, and a run's files would land among the user's)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a folder path, got {text!r}")
    return text


folder_path.__name__ = "path"


def exception_summary(e: BaseException, limit: int = 160) -> str:
    """``"<type>: <first sentence of the message>"`` on one line, at most ``limit`` characters of message (library
    exceptions wrapped into a ``<argument>: ...`` error keep what is wrong, not their advice or internals)."""
    return f"{type(e).__name__}: {' '.join(str(e).split()).split('. ')[0][:limit]}"


def consecutive_seeds(first: int, count: int) -> list[int]:
    """``[first, first + count)``; ``ValueError`` naming ``seed`` when the last one exceeds :data:`MAX_INT`."""
    if first + count - 1 > MAX_INT:
        raise ValueError(f"seed: the seeds seed..seed+{count - 1} must stay ≤ 2**63 - 1, got seed={first}")
    return list(range(first, first + count))


def error_line(e: BaseException, flags: Iterable[str] | Mapping[str, str] = ()) -> str:
    """``error: <argument>: <expected>`` for an exception whose message starts with ``<argument>: ``; a name in
    ``flags`` is shown as its flag (``max_new_tokens`` → ``--max-new-tokens``, or as ``flags[name]`` for a
    mapping)."""
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError)) and e.args and isinstance(e.args[0], str) \
            and len(e.args) == 1:
        msg = e.args[0]
    elif isinstance(e, OSError) and e.filename is not None:
        msg = f"{e.filename}: {e.strerror or e}"
    else:
        msg = str(e)
    msg = " ".join(msg.split())
    name, sep, rest = msg.partition(": ")
    shown = dict(flags) if isinstance(flags, Mapping) else {f: f"--{f.replace('_', '-')}" for f in flags}
    if sep and name in shown:
        msg = f"{shown[name]}: {rest}"
    return f"error: {msg}"


def run(body: Callable[[], int | None], *, flags: Iterable[str] | Mapping[str, str] = (), prog: str = "ctpo_lab",
        errors: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError)) -> int:
    """Run a command's ``body`` under the contract; returns its exit status (``None`` → 0).

    A command owns its process: freed memory is kept for reuse first (:func:`ctpo_lab.allocator.retain_freed_memory`;
    the same numbers, fewer page faults)."""
    retain_freed_memory()
    _IN_RUN.append(True)
    try:
        rc = body()
        return 0 if rc is None else int(rc)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except errors as e:
        print(error_line(e, flags), file=sys.stderr)
        return EXIT_USAGE
    finally:
        _IN_RUN.pop()
