"""Shared figure plumbing: style, saving (PNG + PDF + caption), provenance, and a result cache.

Every figure is written as ``NAME.png``, ``NAME.pdf`` and ``NAME.caption.txt``; the caption gives the finding,
the command that made it, the seeds, the package versions and the git revision.  Results that take long to
compute are cached under ``<out>/.cache/`` keyed by a hash of the producing configuration *and* of the
ctpo_lab source code, so that a changed input or a changed estimator recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import ctpo_lab  # noqa: E402
from ctpo_lab.machine import machine_record  # noqa: E402

__all__ = ["apply_style", "provenance", "caption_text", "save_figure", "save_table", "cached", "source_hash"]

_PACKAGE_DIR = Path(ctpo_lab.__file__).resolve().parent


def apply_style() -> None:
    """Readable defaults shared by every figure."""
    plt.rcParams.update({
        "figure.dpi": 110, "savefig.dpi": 150, "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
        "legend.fontsize": 8.5, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
        "axes.spines.right": False, "figure.constrained_layout.use": True,
    })


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_PACKAGE_DIR, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_PACKAGE_DIR,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def provenance() -> dict[str, str]:
    """Package versions, Python, platform and git revision, for captions and result files."""
    import numpy
    import torch

    versions = {"ctpo_lab": ctpo_lab.__version__, "python": platform.python_version(), "numpy": numpy.__version__,
                "torch": torch.__version__, "matplotlib": matplotlib.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    versions["git"] = _git_revision()
    versions["platform"] = platform.platform(terse=True)
    machine = machine_record()
    versions["processor"] = f"{machine['processor']} ({machine['cpu_capability']}, {machine['cores']} cores)"
    return versions


def caption_text(finding: str, command: str, seeds: Any, extra: dict[str, Any] | None) -> str:
    lines = [finding.strip(), "", f"command: {command}", f"seeds: {seeds}"]
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in provenance().items()))
    return "\n".join(lines) + "\n"


def save_figure(fig: plt.Figure, out_dir: Path, name: str, *, finding: str, command: str, seeds: Any,
                extra: dict[str, Any] | None = None) -> list[Path]:
    """Write ``name``.png/.pdf/.caption.txt into ``out_dir`` and close the figure; returns the paths."""
    from ctpo_lab.runsafety import atomic_path, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf", out_dir / f"{name}.caption.txt"]
    for path in paths[:2]:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix[1:])
    plt.close(fig)
    atomic_write_text(paths[2], caption_text(finding, command, seeds, extra))
    return paths


def save_table(df, out_dir: Path, name: str, *, finding: str, command: str, seeds: Any,
               extra: dict[str, Any] | None = None) -> list[Path]:
    """Write a pandas DataFrame as ``name``.csv and ``name``.md (with the caption below the table)."""
    from ctpo_lab.runsafety import atomic_path, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    csv, md = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    with atomic_path(csv) as tmp:
        df.to_csv(tmp, index=False)
    atomic_write_text(md, df.to_markdown(index=False) + "\n\n" + caption_text(finding, command, seeds, extra))
    return [csv, md]


def source_hash() -> str:
    """Hash of every ctpo_lab source file: cached results are recomputed when the code changes."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        if "figures" in path.relative_to(_PACKAGE_DIR).parts:
            continue  # plotting changes do not invalidate computed results
        h.update(str(path.relative_to(_PACKAGE_DIR)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cached(cache_dir: Path, name: str, config: dict[str, Any], compute: Callable[[], Any],
           *, refresh: bool = False) -> Any:
    """Return ``compute()``, reusing a pickled result when ``config`` and the source are unchanged."""
    key = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()
                         + source_hash().encode()).hexdigest()[:16]
    path = cache_dir / f"{name}-{key}.pkl"
    if path.exists() and not refresh:
        try:
            with path.open("rb") as fh:
                result = pickle.load(fh)
            print(f"[figures] {name}: reusing cached result {path.name}", file=sys.stderr)
            return result
        except Exception as e:  # a truncated or corrupt cache entry: recompute it
            print(f"[figures] {name}: cached result {path.name} is unreadable ({type(e).__name__}); recomputing",
                  file=sys.stderr)
    result = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        pickle.dump(result, fh)
    tmp.replace(path)
    return result
