"""The run folder: ``config.yaml``, ``metrics.jsonl``, ``tb/`` (TensorBoard), ``ckpt/``, ``ratios/``.

* An existing, non-empty folder is never reused without ``resume=True`` or ``overwrite=True``
  (``ValueError`` before any work); ``overwrite`` empties only a folder ctpo_lab created (its ``.ctpo_lab``
  marker), and the writer holds the folder's lock for its life, so a second trainer (or a ``--resume`` /
  ``--overwrite`` of a running run) is refused naming the holder's PID (:mod:`ctpo_lab.runsafety`).
* ``config.yaml``, ``finished.json`` and checkpoints are written atomically; ``metrics.jsonl`` one line per write
  (a partial last line left by a crash is dropped on read).  A corrupt newest checkpoint falls back to the
  previous readable one, saying so.
* Checkpoints ``ckpt/step_XXXXXXX.pt`` hold the model, the optimizer, every RNG state (Python, NumPy,
  torch CPU and CUDA) and the trainer counters; they are written atomically and the newest ``keep`` are kept.
* On resume, ``metrics.jsonl`` is truncated to the checkpoint's step and TensorBoard purges later events, so a
  resumed run logs exactly what an uninterrupted one does.
* W&B only when ``track=True`` (imported lazily; offline machines never need it).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ctpo_lab.cli import MAX_COUNT, exception_summary
from ctpo_lab.runsafety import (
    LOCK,
    MARKER,
    atomic_write_text,
    check_entry,
    prepare_output,
    read_json,
    read_jsonl,
    read_yaml,
    release_folder,
)

__all__ = ["RunFolder", "rng_state", "set_rng_state", "FINISHED_FILE", "ENTRIES"]

FINISHED_FILE = "finished.json"

#: What each entry of a run folder is: ``"file"`` (a regular file) or ``"dir"`` (a folder); the checkpoints
#: (``ckpt/step_*.pt``) and ratio dumps (``ratios/*.npz``) are regular files.
ENTRIES = {
    MARKER: "file",
    LOCK: "file",
    "config.yaml": "file",
    "metrics.jsonl": "file",
    FINISHED_FILE: "file",
    "ckpt": "dir",
    "ratios": "dir",
    "tb": "dir",
    "wandb": "dir",
}


def rng_state() -> dict[str, Any]:
    """Every global RNG state (Python, NumPy, torch CPU, every CUDA device)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class RunFolder:
    """Owns one run directory. Construct it first: it refuses to clobber before anything else happens."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        resume: bool = False,
        overwrite: bool = False,
        keep: int = 2,
        writer: bool = True,
    ) -> None:
        self.path = Path(path)
        self.writer = writer
        if writer:
            prepare_output(self.path, command="python -m ctpo_lab.train", resume=resume, overwrite=overwrite)
        self.ckpt_dir = self.path / "ckpt"
        self.ratio_dir = self.path / "ratios"
        self.metrics_path = self.path / "metrics.jsonl"
        self.keep = keep
        self._tb = None
        self._wandb = None

    @staticmethod
    def check(path: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> bool:
        """Read-only checks (raise ``ValueError``); returns whether the folder exists and is non-empty.
        A non-``writer`` RunFolder (data-parallel ranks > 0) never writes: its writing methods are no-ops."""
        return prepare_output(path, command="python -m ctpo_lab.train", resume=resume, overwrite=overwrite,
                              check_only=True)

    @staticmethod
    def check_entries(path: str | os.PathLike[str]) -> None:
        """Read-only: ``ValueError`` naming the path when an entry of the run folder ``path`` is not what the trainer
        reads or writes there (a folder named ``metrics.jsonl``, a file named ``tb`` or ``ckpt``, a folder named
        like a checkpoint, ...), so a resume is refused before anything is built or written."""
        p = Path(path)
        if not p.is_dir():
            return
        for entry, kind in ENTRIES.items():
            check_entry(p / entry, kind, name="resume")
        for sub, pattern in (("ckpt", "step_*.pt"), ("ratios", "*.npz")):
            if (p / sub).is_dir():
                for f in sorted((p / sub).glob(pattern)):
                    check_entry(f, "file", name="resume")

    @staticmethod
    def finished_summary(path: str | os.PathLike[str], *, name: str = "resume") -> dict[str, Any] | None:
        """The ``finished.json`` of a completed run (validated: ``steps`` an int in [1, 2**31 − 1], ``wall_time`` a
        finite number ≥ 0, ``final`` a JSON object), or None when there is none.  ``ValueError`` naming the file
        when it is not a regular file or is corrupt."""
        f = Path(path) / FINISHED_FILE
        check_entry(f, "file", name=name)
        if not f.is_file():
            return None
        data = read_json(f, name=name)

        def bad(what: str) -> ValueError:
            return ValueError(f"{name}: {f}: {what}; the file is corrupt (remove it to continue the run)")

        steps = data.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_COUNT:
            got = repr(steps) if "steps" in data else "no 'steps'"
            raise bad(f"expected 'steps' to be an int in [1, {MAX_COUNT}], got {got}"[:300])
        wall = data.get("wall_time", 0.0)
        if wall is not None and (isinstance(wall, bool) or not isinstance(wall, (int, float))
                                 or not math.isfinite(wall) or wall < 0):
            raise bad(f"expected 'wall_time' to be a finite number ≥ 0, got {wall!r}"[:300])
        final = data.get("final")
        if final is not None and not isinstance(final, dict):
            raise bad(f"expected 'final' to be a JSON object (the last logged record), got {type(final).__name__}")
        return data

    # ------------------------------------------------------------------ config
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def read_config(self) -> dict[str, Any] | None:
        check_entry(self.config_path, "file", name="resume")
        return read_yaml(self.config_path, name="resume", allow_empty=False) if self.config_path.is_file() else None

    def write_config(self, config: dict[str, Any]) -> None:
        if not self.writer:
            return
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self) -> list[Path]:
        return sorted(self.ckpt_dir.glob("step_*.pt")) if self.ckpt_dir.is_dir() else []

    def latest_checkpoint(self) -> Path | None:
        ck = self.checkpoints()
        return ck[-1] if ck else None

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        target = self.ckpt_dir / f"step_{step:07d}.pt"
        if not self.writer:
            return target
        self.ckpt_dir.mkdir(exist_ok=True)
        tmp = target.with_suffix(".pt.tmp")
        torch.save({**state, "step": step, "rng": rng_state()}, tmp)
        os.replace(tmp, target)
        for old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        return target

    def load_checkpoint(
        self, path: Path | None = None, map_location: str | torch.device = "cpu"
    ) -> dict[str, Any]:
        """The checkpoint ``path``, or (``None``) the newest readable one: a corrupt or truncated newer file is
        reported on stderr and skipped.  ``ValueError`` naming the files when none is readable."""
        candidates = [path] if path is not None else list(reversed(self.checkpoints()))
        if not candidates:
            raise ValueError(f"resume: no checkpoint in {str(self.ckpt_dir)!r}")
        problems: list[tuple[Path, str]] = []
        for p in candidates:
            try:
                state = torch.load(p, map_location=map_location, weights_only=False)
                if not isinstance(state, dict) or not {"model", "optimizer", "rng", "step"} <= set(state):
                    raise ValueError("not a ctpo_lab checkpoint (model/optimizer/rng/step missing)")
                step = state["step"]
                if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_COUNT:
                    raise ValueError(f"its step is not an int in [0, {MAX_COUNT}] ({str(step)[:40]!r})")
            except Exception as e:  # truncated zip, bad pickle, wrong content: all mean "unreadable"
                problems.append((p, exception_summary(e)))
                continue
            for bad, why in problems:  # said only now that a fallback succeeded (else the error says it all)
                print(f"[ctpo_lab.train] checkpoint {bad} is unreadable ({why}); falling back to {p}",
                      file=sys.stderr, flush=True)
            return state
        raise ValueError("resume: no readable checkpoint: " + "; ".join(f"{p}: {why}" for p, why in problems))

    # ------------------------------------------------------------------ logging
    def open_loggers(
        self,
        *,
        start_step: int,
        tensorboard: bool,
        track: bool,
        config: dict[str, Any],
        project: str = "ctpo_lab",
        name: str | None = None,
    ) -> None:
        """Truncate ``metrics.jsonl`` to ``start_step`` and open TensorBoard / W&B."""
        if not self.writer:
            return
        if self.metrics_path.is_file():  # a fresh start (step 0) keeps nothing
            kept = [r for r in read_jsonl(self.metrics_path, name="resume", step_key="step")
                    if r["step"] <= start_step] if start_step > 0 else []
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"), purge_step=start_step + 1 if start_step else None)
        if track:
            import wandb  # noqa: F401  (checked by the trainer before any work)

            self._wandb = wandb.init(
                project=project,
                name=name or self.path.name,
                config=config,
                dir=str(self.path),
                resume="allow",
            )

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must contain ``step``) to every open logger."""
        if not self.writer:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        step = int(record["step"])
        if self._tb is not None:
            for k, v in record.items():
                if (
                    k != "step"
                    and isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and math.isfinite(v)
                ):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return read_jsonl(self.metrics_path, name="resume", step_key="step")

    def mark_finished(self, summary: dict[str, Any]) -> None:
        if not self.writer:
            return
        atomic_write_text(self.path / FINISHED_FILE, json.dumps(summary, indent=1))

    def close(self) -> None:
        """Close the loggers and release the folder's lock (the run is over; exiting would release it too)."""
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self.writer:
            release_folder(self.path)
